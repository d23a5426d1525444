"""What a load test sends and how it checks the answers: weighted model/version targets, images with
known labels, sampled response checks. Plain Python (no Locust), so tests can use it directly."""
import random
from dataclasses import dataclass

from loadtest.images import Sample

PING = "ping"  # a target that requests /ping (the HTTP floor) instead of a prediction


@dataclass(frozen=True)
class Target:
    model: str  # or PING
    version: str | None
    weight: float

    @property
    def name(self) -> str:  # the row in Locust's statistics and in the summary
        return self.model if self.model == PING else f"{self.model}/{self.version or 'default'}"

    @property
    def path(self) -> str:
        return "/ping" if self.model == PING else f"/predictions/{self.name if self.version else self.model}"


def parse_targets(spec: str) -> list[Target]:
    """"mnist_lenet5:1.0=6,cifar10_resnet18=2" -> targets; a missing weight is 1."""
    targets = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, weight = item.partition("=")
        model, _, version = name.partition(":")
        targets.append(Target(model, version or None, float(weight or 1)))
    if not targets or any(t.weight <= 0 for t in targets):
        raise ValueError(f"--targets {spec!r}: need model[:version]=weight items with weights > 0")
    return targets


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

    def __init__(self, targets: list[Target], pools: dict[str, list[Sample]], check_every: int):
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
