"""The run's report, in Markdown: a table of scores, then every survivor with its diff."""

from __future__ import annotations

from tools.mutation.results import ModuleResult


def score_table(results: list[ModuleResult]) -> str:
    rows = [
        "| module | mutants | killed | timeout | survived | equivalent | score |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.error:
            rows.append(f"| {r.module.name} | - | - | - | - | - | {r.error} |")
            continue
        equivalent = len(r.survivors) - len(r.unexplained)
        rows.append(
            f"| {r.module.name} | {r.total} | {r.killed} | {r.timeout} | {len(r.survivors)} "
            f"| {equivalent} | {100 * r.score:.1f}% |"
        )
    done = [r for r in results if not r.error]
    total = sum(r.total for r in done)
    caught = sum(r.caught for r in done)
    if total:
        rows.append(f"| **all** | {total} | | | | | **{100 * caught / total:.1f}%** |")
    return "\n".join(rows)


def run_list(results: list[ModuleResult]) -> str:
    """Which runs each module's results come from (the code and tests they saw)."""
    return "\n".join(f"- {r.module.name}: {'; '.join(r.runs) or 'unknown'}" for r in results)


def survivor_sections(results: list[ModuleResult]) -> str:
    parts: list[str] = []
    for r in results:
        if not r.survivors:
            continue
        parts.append(f"## {r.module.name} (`{r.module.path}`)\n")
        for s in r.survivors:
            verdict = (
                f"equivalent: {s.equivalent.reason}"
                if s.equivalent is not None
                else "**not explained**"
            )
            parts.append(f"### `{s.mutant}` ({s.status})\n\n{verdict}\n\n```diff\n{s.diff}\n```\n")
    return "\n".join(parts)


def render(results: list[ModuleResult], header: str) -> str:
    return "\n\n".join(
        [
            "# Mutation testing report",
            header,
            score_table(results),
            "Runs:\n\n" + run_list(results),
            "Score: mutants killed (a test failed) or timed out, over all mutants. Every "
            "survivor is listed below, with the reason it is equivalent when "
            "tools/mutation/equivalent.toml gives one.",
            survivor_sections(results),
        ]
    )
