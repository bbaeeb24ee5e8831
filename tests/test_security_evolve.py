"""The adaptive search's loop on a simulated target: a fixed rule decides which attacks succeed
and a fixed score stands for the white-box pass, so the search's bookkeeping is checked exactly."""

from __future__ import annotations

from pyagent.security.attacks import load_corpus
from pyagent.security.campaign import Attempt
from pyagent.security.cases import DEFENSES
from pyagent.security.evolve import Evolver, Gene, static_search
from pyagent.security.judges import Evidence, Verdict
from pyagent.security.targets import AssistantTarget, Outcome

CALLS_PER_RUN = 3


class Simulated(Evolver):
    """An evolver whose white-box score favours the document channel, for which the rule below
    makes every attack succeed."""

    def score(self, gene: Gene) -> float:
        return -1.0 if gene.channel == "document" else -20.0


def field(case) -> Attempt:
    hit = case.channel == "document"
    evidence = Evidence(llm_calls=CALLS_PER_RUN)
    return Attempt(case, Outcome(evidence, True, 0.1), Verdict(hit, hit, ""), {})


def test_the_search_explores_by_score_then_exploits_winners_without_scoring():
    target = AssistantTarget(backend=None)
    search = Simulated(target, None, "forbidden_tool", load_corpus(), DEFENSES["none"],
                       seed=3).run(60, field=field)
    assert 60 <= search.calls < 60 + CALLS_PER_RUN  # the budget, overshot by one run at most
    assert search.calls == search.scored + CALLS_PER_RUN * len(search.trials)
    first = next(i for i, t in enumerate(search.trials) if t.hit)
    later = search.trials[first + 2:]  # after the first hit's generation (2 fielded each)
    assert later and all(t.logprob is None for t in later)  # fielded without a white-box pass
    assert sum(t.hit for t in later) / len(later) > 0.5  # the winners' children mostly win
    genes = [t.gene.id for t in search.trials]
    assert len(genes) == len(set(genes))  # nothing fielded twice: every hit is distinct
    assert search.summary()["distinct_successful_attacks"] == sum(t.hit for t in search.trials)


def test_the_same_seed_searches_the_same_way():
    target = AssistantTarget(backend=None)
    runs = [[t.gene.id for t in Simulated(target, None, "write_canary", load_corpus(),
                                          DEFENSES["none"], seed=5).run(40, field=field).trials]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_static_search_stops_at_the_budget():
    target = AssistantTarget(backend=None)
    evolver = Simulated(target, None, "forbidden_tool", load_corpus(), DEFENSES["none"])
    cases = [evolver.case(evolver.seed_gene()) for _ in range(50)]
    search = static_search(cases, 20, field)
    assert search.calls == 21 and len(search.trials) == 7 and search.scored == 0
