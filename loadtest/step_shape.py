"""Step load for Locust: the user count rises step by step and the run stops after the last step.
Loaded beside the locustfile (`locust -f loadtest/locustfile.py,loadtest/step_shape.py`, which
`python -m loadtest.run --step` does); loadtest/report.py then finds the knee per step.

Options: --step-users "1,2,4,8,16" (users per step), --step-s (seconds per step).
"""
from locust import LoadTestShape, events

from loadtest import settings


@events.init_command_line_parser.add_listener
def add_options(parser):
    parser.add_argument("--step-users", default=",".join(map(str, settings.STEP_USERS)),
                        help="user count of each step, comma-separated")
    parser.add_argument("--step-s", type=float, default=settings.STEP_S, help="seconds per step")


class StepLoadShape(LoadTestShape):
    def tick(self):
        opts = self.runner.environment.parsed_options
        steps = [int(u) for u in opts.step_users.split(",")]
        step = int(self.get_run_time() // opts.step_s)
        if step >= len(steps):
            return None
        return steps[step], max(steps)  # start each step's users at once: the whole step is measured load
