"""The adapter registry: source id -> adapter module (docs/sources.md §4).

Registration is explicit, so nothing is looked up by string at run time and one test can check
that the modules here, these keys and the source table of docs/sources.md are the same seven.
"""

from __future__ import annotations

from collections.abc import Mapping

from adapters import amplitude, clevertap, customerglu, moengage, segment, usermaven, webengage
from pipeline.adapting import AdapterModule

ADAPTERS: Mapping[str, AdapterModule] = {
    m.SOURCE: m for m in (customerglu, segment, moengage, amplitude, clevertap, webengage, usermaven)
}
