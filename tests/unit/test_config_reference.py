"""docs/configuration.md's field reference is generated from the schema and kept current."""

from tasks.config_reference import BEGIN, END, main, render, updated


def test_the_reference_in_the_docs_is_current():
    assert main(["--check"]) == 0, "run: python -m tasks.config_reference"


def test_a_stale_reference_is_found_and_rewritten():
    stale = f"# Configuration\n\n{BEGIN}\n| `data.old_field` | int |\n{END}\nafter\n"
    assert "data.old_field" not in updated(stale)
    assert updated(stale).endswith(f"{END}\nafter\n") and render() in updated(stale)
