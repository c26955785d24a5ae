"""The cache view while several sessions run: concurrent generation, preemption, forks sharing
blocks, swarm tenants, a pool larger than the map, the guided demo."""
from __future__ import annotations

from chatpager import SamplingParams
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import (decoding, ENDLESS, GatedApp, hold, loaded, make_app, plain, running, say, stats,
                                step_until, until)

# no EOS (a reply that ends at its first token is never seen generating); short, to end soon once released
REPLY = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True)


async def test_two_sessions_generate_at_the_same_time(model, tmp_path):
    app = make_app(model, tmp_path, params=REPLY)
    async with running(app) as pilot:
        await loaded(pilot)
        await hold(pilot)  # the engine steps only when told: neither reply can end while we look
        await say(pilot, "first")
        first = app.current
        await step_until(pilot, lambda: decoding(app, first))  # prefilled: its blocks are cached
        await say(pilot, "/new tutor")
        await say(pilot, "second")
        second = app.current
        assert second.state == "queued"
        await step_until(pilot, lambda: decoding(app, second))
        assert decoding(app, first, second) and stats(app)["running"] == 2
        await until(pilot, lambda: first.state == second.state == "generating")
        # both prompts start with the house style: the second one's prefill hit the cache
        assert second.cached_tokens > 1000
        assert "generating" in str(app.main.query_one(SessionList).options[0].prompt)
        app.engine.release()
        await until(pilot, lambda: not first.busy and not second.busy)
        assert [m.role for m in second.messages] == ["user", "assistant"]


def preempted(app) -> bool:
    """A sequence waits in the engine with tokens generated: it was preempted."""
    return any(v.status != "running" and v.num_tokens > v.num_prompt_tokens for v in app.engine.snapshot.sequences)


async def test_a_full_pool_preempts_and_the_session_shows_it(model, tmp_path):
    # 12 blocks of 16: once the two replies have outgrown them, the newer one waits while the
    # other grows to the pool's size (tens of steps; the hold keeps it there to be seen)
    app = make_app(model, tmp_path, num_blocks=12, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await hold(pilot)
        await say(pilot, "/system terse")
        await say(pilot, "one")
        await say(pilot, "/new terse")
        await say(pilot, "two")
        await step_until(pilot, lambda: preempted(app), steps=4)
        assert stats(app)["preemptions"] > 0 and stats(app)["running"] == 1
        sidebar = app.main.query_one(SessionList)
        await until(pilot, lambda: [s.state for s in app.sessions.values()].count("preempted") == 1)
        assert "preempted" in str(sidebar.options[0].prompt) + str(sidebar.options[1].prompt)
        app.engine.release()
        # each reply ends at the pool's size ("length"); neither request failed
        await until(pilot, lambda: not any(s.busy for s in app.sessions.values()))
        assert all(s.error is None and s.messages[-1].role == "assistant"
                   for s in app.sessions.values())


async def test_fork_while_streaming_shares_blocks(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await hold(pilot)
        await say(pilot, "branch me")
        source = app.current
        await step_until(pilot, lambda: decoding(app, source) and source.reply)
        await until(pilot, lambda: source.state == "generating")
        assert stats(app)["shared_blocks"] == 0
        await pilot.press("ctrl+f")
        fork = app.current
        assert fork is not source and fork.title == "Chat 1 (fork)"
        assert [m.content for m in fork.messages] == ["branch me"]
        await hold(pilot)  # the fork is applied, not stepped: every block is shared
        assert stats(app)["shared_blocks"] > 0 and stats(app)["sharing_ratio"] > 1
        branched_at = fork.reply
        assert branched_at == source.reply
        await step_until(pilot, lambda: len(fork.reply) > len(branched_at))  # it continues on its own
        app.engine.release()
        await pilot.press("escape")
        await pilot.press("ctrl+up")
        await pilot.press("escape")
        await until(pilot, lambda: not source.busy and not fork.busy)
        await until(pilot, lambda: stats(app)["used_blocks"] == 0)


async def test_swarm_tenants_share_prefixes_and_can_be_stopped(model, tmp_path):
    tenant_params = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True)
    app = make_app(model, tmp_path, app_class=GatedApp, swarm=2, swarm_params=tenant_params)
    async with running(app) as pilot:  # started as with --swarm 2
        await say(pilot, "/swarm 1")
        tenants = [s for s in app.sessions.values() if app.swarm.is_tenant(s)]
        assert [t.title for t in tenants] == ["tenant 1", "tenant 2", "tenant 3"]
        assert len(app.main.query_one(SessionList).options) == 4
        assert {t.state for t in tenants} == {"queued"}
        app.engine.hold()  # after their submits: held once the model has loaded and taken them
        app.release.set()
        await until(pilot, lambda: app.engine.held)
        # tenants 1-3 use prompts that start with the same house style
        await step_until(pilot, lambda: stats(app)["running"] >= 2 and stats(app)["prefix_hit_tokens"] > 1000)
        assert all(t.busy for t in tenants)  # held: every first reply is still going
        await say(pilot, "/swarm 0")
        steps = stats(app)["steps"]
        app.engine.release()
        await until(pilot, lambda: not any(t.busy for t in tenants))
        assert app.swarm.active == 0
        # stopped, not finished: their aborts were all the engine did after the release, and
        # no tenant's script sent a second turn
        await until(pilot, lambda: not app.engine.snapshot.sequences)
        assert stats(app)["steps"] <= steps + 1
        assert all([m.role for m in t.messages].count("user") == 1 for t in tenants)
        assert not any(t.stored for t in tenants)  # simulated load is not the user's data


async def test_a_pool_larger_than_the_map_is_drawn_in_groups(model, tmp_path):
    app = make_app(model, tmp_path, num_blocks=6000)
    async with running(app) as pilot:
        await loaded(pilot)
        await pilot.pause(0.2)
        block_map = app.main.query_one(BlockMap)
        per_cell = block_map.blocks_per_cell()
        assert per_cell > 1
        cells = len(block_map.cells())
        assert cells == -(-6000 // per_cell) <= block_map.size.width * block_map.size.height


async def test_the_guided_demo_walks_through_every_step(model, tmp_path):
    from chatpager.tui.demo import Tour

    prompts = tmp_path / "prompts"  # short prompts (byte tokens) that share a preamble
    prompts.mkdir()
    (prompts / "_base.md").write_text("You are a helpful assistant. Be exact, kind and brief. " * 2)
    for name in ("assistant", "tutor", "pirate", "critic"):
        (prompts / f"{name}.md").write_text(f"@include _base.md\n\nRole: the {name}, who answers "
                                            f"as a {name} would.")
    tenants = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True)
    app = make_app(model, tmp_path, num_blocks=64, prompts_dir=prompts, swarm_params=tenants,
                   demo=True)  # as `chatpager --demo` starts
    async with running(app) as pilot:
        tour = app.tour
        assert isinstance(tour, Tour) and tour.index == 0
        caption = app.main.query_one("#demo-caption")
        seen = []
        for step in range(len(tour.steps)):
            await until(pilot, lambda: tour.ready(), timeout=120)
            await until(pilot, lambda: "Space / → next step" in str(caption.render())
                        or "Esc ends the tour" in str(caption.render()))
            seen.append(tour.step.title)
            if step == 1:
                assert app.current.title == "demo B" and app.current.cached_tokens > 0
            if step == 5:
                assert "vs contig" in plain(app.main.query_one("CacheStats").content)
                assert "the memory" in str(caption.render()) or "No sequence" in str(caption.render())
            if step < len(tour.steps) - 1:
                await pilot.press("space")
                assert tour.index == step + 1
        assert seen == [s.title for s in tour.steps]
        assert stats(app)["evictions"] > 0 and stats(app)["preemptions"] > 0
        await pilot.press("escape")
        await until(pilot, lambda: app.tour is None)
        assert not caption.display
        assert [s.title for s in app.sessions.values()] == ["Chat 1"]  # the tour's are gone
