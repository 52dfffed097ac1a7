"""Result types returned by the clients: the protocol's declared replies.

They are the same classes the worker builds its replies from
(:mod:`llamafleet.runtime.protocol`), so every field a worker sends is an
attribute here, typed.
"""

from llamafleet.runtime.protocol import (
                                         AdapterLoaded,
                                         Completion,
                                         CompletionStats,
                                         Decoded,
                                         Info,
                                         Pong,
                                         SchedulerStats,
                                         WorkerEndpoint,
)

__all__ = ["Completion", "CompletionStats", "Decoded", "Info", "Pong", "SchedulerStats",
           "AdapterLoaded", "WorkerEndpoint"]
