"""The benchmarks' embedding step with exchange capacities from the traffic.

bench/embedding.py's step (``_build_ours`` with ``capacities="traffic"``) returns each
step's exchange counts; ``TrafficStep`` feeds them to a ``CapacityChooser`` one step late
(as ``lf_jax.train.step.TrainStep`` does for the train step, so the dispatch stays
asynchronous) and compiles the step once per capacity set it visits. Used by
bench/step_scale_ab.py and bench/step_rusage.py, which may run a renamed copy of another
tree's package (``package``).

Example:
    >>> coll, batches, r_d, jitted = bench._build_ours({**cfg, "capacities": "traffic"})
    >>> step = TrafficStep(coll, jitted, r_d, cfg["batch"])
    >>> state, loss = step.settle(state, batches[0])  # sizes the next steps' capacities
    >>> state, loss = step(state, batches[1])
"""

import importlib


class TrafficStep:
    """step(state, batch) -> (state, loss): one donated step with the chooser's capacities."""

    def __init__(self, coll, jitted, r_d, batch_size: int, package: str = "lf_jax"):
        capacity = importlib.import_module(f"{package}.embedding.capacity")
        self.chooser = capacity.CapacityChooser(coll, batch_size)
        self.jitted, self.r_d = jitted, r_d
        self.compiled: dict = {}  # capacities -> compiled step
        self.late = None  # the previous step's counts, observed at the next step

    def __call__(self, state, batch):
        caps = self.chooser.capacities()
        if caps not in self.compiled:
            lowered = self.jitted.lower(state, batch, self.r_d, capacities=caps)
            self.compiled[caps] = lowered.compile()
        state, (loss, counts) = self.compiled[caps](state, batch, self.r_d)
        if self.late is not None:
            self.chooser.observe(self.late)  # done by now: no wait
        self.late = counts
        return state, loss

    def settle(self, state, batch):
        """One step whose counts are observed at once (waiting for them): the next
        step runs, and compiles, with capacities from the traffic."""
        state, loss = self(state, batch)
        self.chooser.observe(self.late)
        self.late = None
        return state, loss

    def current(self):
        """The compiled step of the capacities the next step takes, or None if not built."""
        return self.compiled.get(self.chooser.capacities())
