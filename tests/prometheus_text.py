"""Reading one value out of a Prometheus text exposition, as PromQL's ``sum(name{labels})`` would."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_value(exposition: str, query: str) -> float:
    """The sum of the samples named as ``query`` (``name`` or ``name{label="value",...}``) whose labels
    include the ones given; 0 when none match. Labels not named (e.g. ``model``) match anything."""
    wanted = next(iter(next(text_string_to_metric_families(query + " 0\n")).samples))
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == wanted.name and all(s.labels.get(k) == v for k, v in wanted.labels.items()):
                total += s.value
    return total
