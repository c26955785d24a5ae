"""The guided demo (`/demo`, `chatpager --demo`): a tour of paging on the live engine.

Six steps, each of which sets its situation up when entered (`Step.start`), says when it can
be seen (`Step.ready`, checked on every refresh against counters taken at the step's start)
and which blocks to point at (`Step.blocks`). The presenter moves on with Space or →, also
before a step is ready; Esc ends the tour. The tour's sessions (demo A, B, the fork and the
tenants) are not stored, and are stopped and removed when it ends.

The later steps need pressure on the pool: `chatpager --demo` starts with a small one
(config.DEMO_NUM_BLOCKS) unless a pool size is given; on a large pool they wait a long time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from chatpager.engine.outputs import CacheSnapshot
from chatpager.engine.sampling_params import SamplingParams
from chatpager.tui.session import Session
from chatpager.tui.sessions import Sessions
from chatpager.tui.swarm import Swarm
from chatpager.tui.turns import Turns

DEMO_PROMPT = "assistant"
REPLY = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=96, ignore_eos=True)
TENANTS_PER_STEP = 8


@dataclass(slots=True)
class Step:
    title: str
    caption: Callable[[], str]
    start: Callable[[], None]
    ready: Callable[[], bool]
    blocks: Callable[[], set[int]] = field(default=lambda: set())


class Tour:
    def __init__(self, sessions: Sessions, turns: Turns, swarm: Swarm,
                 snapshot: Callable[[], CacheSnapshot | None]) -> None:
        self.sessions, self.turns, self.swarm = sessions, turns, swarm
        self._snapshot = snapshot
        self.index = -1
        self.focus: Session | None = None  # the session the chat pane should show
        self._own: list[Session] = []  # every session the tour made
        self._at_start: dict = {}  # counters when the step began
        self._a = self._b = self._fork = None
        prompt = DEMO_PROMPT if DEMO_PROMPT in sessions.prompts else next(iter(sessions.prompts))
        self._prompt = prompt
        self.steps = [
            Step("Blocks on demand", self._caption_1, self._start_1, self._ready_1, self._blocks_a),
            Step("A shared system prompt", self._caption_2, self._start_2, self._ready_2, self._shared),
            Step("Fork and copy-on-write", self._caption_3, self._start_3, self._ready_3, self._cow),
            Step("Cached blocks age, then are evicted", self._caption_4, self._start_4,
                 self._ready_4, self._cached),
            Step("Pool exhausted: preemption", self._caption_5, self._start_5, self._ready_5),
            Step("The payoff", self._caption_6, lambda: None, lambda: True),
        ]

    # -- driving the tour ------------------------------------------------------------------------
    @property
    def step(self) -> Step:
        return self.steps[self.index]

    def next(self) -> bool:
        """Enter the next step; False when the tour is over."""
        if self.index + 1 >= len(self.steps):
            return False
        self.index += 1
        snapshot = self._snapshot()
        self._at_start = dict(snapshot.stats) if snapshot else {}
        self.step.start()
        return True

    def ready(self) -> bool:
        return self._snapshot() is not None and self.step.ready()

    def caption(self) -> str:
        if not self.ready():
            state = "setting up… (Space / → skips ahead) · Esc leaves"
        elif self.index + 1 < len(self.steps):
            state = "Space / → next step · Esc leaves"
        else:
            state = "Esc ends the tour"
        return (f"Demo {self.index + 1}/{len(self.steps)} · {self.step.title}\n\n"
                f"{self.step.caption()}\n\n{state}")

    def highlight(self) -> set[int]:
        return self.step.blocks() if self._snapshot() is not None else set()

    def end(self) -> None:
        """Stop everything the tour started and remove its sessions."""
        for session in self._own:
            if session.id in self.sessions:
                if self.swarm.is_tenant(session):
                    self.swarm.stop(session)
                self.turns.delete(session)
        self._own.clear()

    # -- helpers ---------------------------------------------------------------------------------
    def _session(self, title: str, question: str) -> Session:
        session = self.sessions.create(self._prompt, title=title, stored=False)
        self._own.append(session)
        self.turns.send(session, question, REPLY)
        self.focus = session
        return session

    def _views(self, session: Session | None):
        snapshot = self._snapshot()
        if snapshot is None or session is None or session.request_id is None:
            return []
        return [v for v in snapshot.sequences if v.request_id.split(".")[0] == session.request_id]

    def _blocks_of(self, session: Session | None) -> set[int]:
        return {block for view in self._views(session) for block in view.held_blocks}

    def _grew(self, counter: str) -> bool:
        snapshot = self._snapshot()
        return snapshot.stats[counter] > self._at_start.get(counter, 0)

    # -- 1. one session --------------------------------------------------------------------------
    def _start_1(self) -> None:
        self._a = self._session("demo A", "Explain in a few paragraphs how virtual memory "
                                          "pages work, and why they help.")

    def _ready_1(self) -> bool:
        return len(self._blocks_a()) >= 2 or (not self._a.busy and self._a.tokens is not None)

    def _blocks_a(self) -> set[int]:
        return self._blocks_of(self._a)

    def _caption_1(self) -> str:
        blocks = sorted(self._blocks_a())
        where = f" (now physical blocks {_ranges(blocks)})" if blocks else ""
        return ("demo A's reply grows token by token; a block is taken from the pool only when "
                "the last one is full, and nothing is reserved ahead. Its block table (below the "
                f"map) maps logical blocks 0, 1, 2… to physical ones{where}: any free block "
                "will do, contiguous or not.")

    # -- 2. a second session, same system prompt ---------------------------------------------------
    def _start_2(self) -> None:
        self._b = self._session("demo B", "What is a hash table? Answer with an example.")

    def _ready_2(self) -> bool:
        return self._b.cached_tokens > 0

    def _shared(self) -> set[int]:
        return self._blocks_of(self._b) & self._blocks_of(self._a)

    def _caption_2(self) -> str:
        hits = (f" {self._b.cached_tokens} of its prompt tokens were prefix-cache hits."
                if self._b and self._b.cached_tokens else "")
        return ("demo B uses the same system prompt. Its first blocks are demo A's, shared "
                f"(×2 on the map), not copies.{hits} Only its own question was computed.")

    # -- 3. fork ---------------------------------------------------------------------------------
    def _start_3(self) -> None:
        self._fork = self.turns.fork(self._a)
        self._own.append(self._fork)
        self.focus = self._fork

    def _ready_3(self) -> bool:
        return self._grew("cow_copies") or (not self._a.busy and not self._fork.busy)

    def _cow(self) -> set[int]:
        snapshot = self._snapshot()
        copied = {destination for _, destination in snapshot.recent_cow}
        return (self._blocks_of(self._fork) & self._blocks_of(self._a)) | (
            copied & self._blocks_of(self._fork))

    def _caption_3(self) -> str:
        return ("The fork continues demo A's reply from the same blocks: every block is shared. "
                "The last block is only partly full; the first branch to write into it gets "
                "its own copy (◆ copied on write) and the full blocks stay shared.")

    # -- 4. many tenants, cached blocks age and are evicted -------------------------------------------
    def _start_4(self) -> None:
        for session in (self._a, self._b, self._fork):
            self.turns.stop(session)
        self._spawn()

    def _spawn(self) -> None:
        tenants = self.swarm.spawn(TENANTS_PER_STEP)
        self._own.extend(tenants)
        self.focus = tenants[0]

    def _ready_4(self) -> bool:
        return self._grew("evictions")

    def _cached(self) -> set[int]:
        snapshot = self._snapshot()
        return {b for b in snapshot.free_order if snapshot.hashed[b]}

    def _caption_4(self) -> str:
        return ("demo A, B and the fork were stopped: their blocks are free but keep their "
                "contents, still hittable (shaded by age, oldest darkest). "
                f"{TENANTS_PER_STEP} tenants now need blocks: once the never-used ones are gone, "
                "the least recently used cached blocks are evicted (see 'evict').")

    # -- 5. preemption ---------------------------------------------------------------------------
    def _start_5(self) -> None:
        self._spawn()

    def _ready_5(self) -> bool:
        return self._grew("preemptions")

    def _caption_5(self) -> str:
        return ("More tenants than the pool holds: when a running sequence needs a block and "
                "none is free, the newest one is preempted (red in the sidebar), its blocks "
                "freed. It resumes later: recompute rebuilds its K/V from its tokens (mostly "
                "prefix hits), swap copies them back; either way its output is unchanged.")

    # -- 6. the payoff ---------------------------------------------------------------------------
    def _caption_6(self) -> str:
        need = self.turns.contiguous_need(self._snapshot())
        if need is None:
            figure = "No sequence is running right now to compare."
        else:
            held, contiguous = need
            figure = (f"The sequences running now hold {held} blocks. Reserving each one's "
                      f"maximum length contiguously would take {contiguous}: "
                      f"{contiguous / held:.1f}× the memory.")
        return (f"{figure} Paging allocates what is used, shares what is equal and reclaims "
                "what is idle; the stats panel keeps this figure ('vs contig').")


def _ranges(blocks: list[int]) -> str:
    shown = ", ".join(map(str, blocks[:8]))
    return shown + ("…" if len(blocks) > 8 else "")
