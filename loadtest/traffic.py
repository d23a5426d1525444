"""What a load test sends and how it checks the answers: weighted model/version targets (of the
LoadSpec, loadtest/spec.py), images with known labels, sampled response checks. Plain Python (no
Locust), so tests can use it directly."""
import random

from loadtest.images import Sample
from loadtest.spec import PING, Target


def wrong_answer(result: dict, target: Target, sample: Sample) -> str | None:
    """Why a prediction response is wrong for this target and image, or None when it is right."""
    if result.get("model") != target.model:
        return f"answered by model {result.get('model')!r}, asked {target.model!r}"
    if target.version and result.get("version") != target.version:
        return f"answered by version {result.get('version')!r}, asked {target.version!r}"
    if result.get("label") != sample.label:
        return f"label {result.get('label')!r}, known label {sample.label!r}"
    return None


class Traffic:
    """What every user of this process sends: weighted targets, images with labels, sampled checks."""

    def __init__(self, targets: tuple[Target, ...], pools: dict[str, list[Sample]], check_every: int):
        self.targets, self.weights = targets, [t.weight for t in targets]
        self.pools, self.check_every = pools, check_every
        self.sent = self.checked = self.mismatches = 0

    def pick(self) -> tuple[Target, Sample | None]:
        target = random.choices(self.targets, self.weights)[0]
        return target, (None if target.model == PING else random.choice(self.pools[target.model]))

    def due_for_check(self) -> bool:
        self.sent += 1
        return self.sent % self.check_every == 0

    def check(self, result: dict, target: Target, sample: Sample) -> str | None:
        problem = wrong_answer(result, target, sample)
        self.checked += 1
        self.mismatches += problem is not None
        return problem
