"""rbee: a self-hosted AI orchestrator with a programmable Rhai scheduler."""

from rbee.errors import PolicyError
from rbee.scheduler import Decision, Policy, Scheduler, State

__all__ = ["Decision", "Policy", "PolicyError", "Scheduler", "State", "__version__"]

__version__ = "0.1.0"
