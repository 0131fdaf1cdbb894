"""docs/configuration.md's field reference is generated from the schema and kept current."""

from tasks.config import AugmentConfig, ModelSpec, PipelineConfig
from tasks.config_reference import BEGIN, END, _section_type, main, render, updated
from tasks.operations.sweep_space import SearchDimension, SweepSchedulerConfig


def test_the_reference_in_the_docs_is_current():
    assert main(["--check"]) == 0, "run: python -m tasks.config_reference"


def test_a_stale_reference_is_found_and_rewritten():
    stale = f"# Configuration\n\n{BEGIN}\n| `data.old_field` | int |\n{END}\nafter\n"
    assert "data.old_field" not in updated(stale)
    assert updated(stale).endswith(f"{END}\nafter\n") and render() in updated(stale)


def _sections(model, seen):
    """Every section model reachable from `model` (itself included), each once."""
    if model in seen:
        return seen
    seen.append(model)
    for field in model.model_fields.values():
        section = _section_type(field.annotation)
        if section is not None:
            _sections(section, seen)
    return seen


def test_every_field_of_every_section_has_a_description():
    sections = _sections(PipelineConfig, [])
    assert {SearchDimension, SweepSchedulerConfig, AugmentConfig, ModelSpec} <= set(sections)
    missing = [f"{section.__name__}.{name}" for section in sections
               for name, field in section.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description (Field(description=...)): {', '.join(missing)}"
    undocumented = [section.__name__ for section in sections if not (section.__doc__ or "").strip()]
    assert not undocumented, f"sections without a docstring: {', '.join(undocumented)}"
