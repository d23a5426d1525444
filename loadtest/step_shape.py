"""Step load for Locust: the user count rises step by step and the run stops after the last step.
Loaded beside the locustfile (`locust -f loadtest/locustfile.py,loadtest/step_shape.py`, which
`python -m loadtest.run --step` does); loadtest/report.py then finds the knee per step.

The steps are the LoadSpec's step_users and step_s (the locustfile's --load-spec).
"""
from locust import LoadTestShape

from loadtest.spec import LoadSpec


class StepLoadShape(LoadTestShape):
    spec: LoadSpec | None = None

    def tick(self):
        if self.spec is None:  # once: the options are parsed by the time the runner ticks
            self.spec = LoadSpec.read(self.runner.environment.parsed_options.load_spec)
        steps = self.spec.step_users
        step = int(self.get_run_time() // self.spec.step_s)
        if step >= len(steps):
            return None
        return steps[step], max(steps)  # start each step's users at once: the whole step is measured load
