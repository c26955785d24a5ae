"""The cache view while several sessions run: concurrent generation, preemption, forks sharing
blocks, swarm tenants, a pool larger than the map, the guided demo."""
from __future__ import annotations

from chatpager import SamplingParams
from chatpager.tui.widgets.block_map import BlockMap
from chatpager.tui.widgets.session_list import SessionList
from tests.tui.support import ENDLESS, GatedApp, loaded, make_app, plain, running, say, stats, until


async def test_two_sessions_generate_at_the_same_time(model, tmp_path):
    # longer than ENDLESS: the tiny model decodes its 4000 tokens (~1,500 tok/s with the C attention)
    # before a busy screen lets the two starts be seen together
    app = make_app(model, tmp_path, params=SamplingParams(temperature=0.8, max_tokens=12000, ignore_eos=True))
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "first")
        await say(pilot, "/new tutor")
        await say(pilot, "second")
        first, second = app.sessions.values()
        await until(pilot, lambda: first.state == second.state == "generating")
        assert stats(app)["running"] == 2
        # both prompts start with the house style: the second one's prefill hit the cache
        assert second.cached_tokens > 1000
        assert "generating" in str(app.main.query_one(SessionList).options[0].prompt)
        for session in (first, second):
            app.turns.stop(session)
        await until(pilot, lambda: not first.busy and not second.busy)


async def test_a_full_pool_preempts_and_the_session_shows_it(model, tmp_path):
    # 48 blocks of 16: 768 tokens in all. The preempted session waits while the other grows to the
    # pool's size: with 12 blocks that took ~0.1 s at the tiny model's ~1,500 tok/s (C attention),
    # shorter than the sidebar's refresh often enough to fail 1 run in 2
    app = make_app(model, tmp_path, app_class=GatedApp, num_blocks=48, params=ENDLESS)
    async with running(app) as pilot:
        await say(pilot, "/system terse")
        await say(pilot, "one")
        await say(pilot, "/new terse")
        await say(pilot, "two")
        app.release.set()  # both start together, and outgrow the pool together
        sidebar = app.main.query_one(SessionList)
        await until(pilot, lambda: "preempted" in str(sidebar.options[0].prompt)
                    + str(sidebar.options[1].prompt), timeout=120)
        assert stats(app)["preemptions"] > 0
        # each reply ends at the pool's size ("length"); neither request failed
        await until(pilot, lambda: not any(s.busy for s in app.sessions.values()))
        assert all(s.error is None and s.messages[-1].role == "assistant"
                   for s in app.sessions.values())


async def test_fork_while_streaming_shares_blocks(model, tmp_path):
    app = make_app(model, tmp_path, params=ENDLESS)
    async with running(app) as pilot:
        await loaded(pilot)
        await say(pilot, "branch me")
        await until(pilot, lambda: app.current.state == "generating")
        assert stats(app)["shared_blocks"] == 0
        source = app.current
        await pilot.press("ctrl+f")
        fork = app.current
        assert fork is not source and fork.title == "Chat 1 (fork)"
        assert [m.content for m in fork.messages] == ["branch me"]
        await until(pilot, lambda: stats(app)["shared_blocks"] > 0)
        assert stats(app)["sharing_ratio"] > 1
        branched_at = fork.reply
        await until(pilot, lambda: len(fork.reply) > len(branched_at))  # it continues on its own
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
        app.release.set()
        await until(pilot, lambda: app.engine.snapshot and stats(app)["running"] >= 2)
        # tenants 1-3 use prompts that start with the same house style
        await until(pilot, lambda: stats(app)["prefix_hit_tokens"] > 1000)
        await say(pilot, "/swarm 0")
        await until(pilot, lambda: not any(t.busy for t in tenants))
        assert app.swarm.active == 0
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
