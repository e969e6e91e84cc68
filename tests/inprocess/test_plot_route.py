"""nodes/plot_route.py inside ComfyUI: what GET /asyndm/schedule_plot answers, and that it reads only listed files."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from asyndm.mask_schedule import table_tracks
from asyndm.schedule_file import load_schedule, save_schedule
from asyndm.schedule_table import ScheduleTable, table_from_curve
from tests.conftest import REPO_ROOT
from tests.inprocess.conftest import PACK_MODULE, load_pack

FOLDER = "asyndm_schedulers"
SHIPPED = REPO_ROOT / "schedules"
BIN = "asyndm-bin-k0.7.safetensors"


@pytest.fixture(scope="module")
def route():
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes.plot_route")


@pytest.fixture
def folders(tmp_path, monkeypatch, route):
    """models_dir in tmp_path/a/models; the scheduler folders = its asyndm_schedulers + the shipped folder;
    valid schedule files wait outside them, where path tricks would lead."""
    import folder_paths

    schedules = importlib.import_module(f"{PACK_MODULE}.nodes.schedules")
    models = tmp_path / "a" / "models"
    user = models / FOLDER
    user.mkdir(parents=True)
    good = (SHIPPED / BIN).read_bytes()
    for bait in (models / "x.safetensors", tmp_path / "a" / "b.safetensors"):
        bait.write_bytes(good)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER,
                        ([str(user), schedules.SHIPPED_SCHEDULES], {".safetensors"}))
    folder_paths.filename_list_cache.pop(FOLDER, None)
    yield user
    folder_paths.filename_list_cache.pop(FOLDER, None)


def answer(route, **query):
    try:
        return 200, route.plot_data({k: str(v) for k, v in query.items()})
    except route.PlotRequestError as e:
        return e.status, {"error": str(e)}


def test_a_listed_file_gives_its_levels_at_its_fitted_steps(route, folders) -> None:
    status, body = answer(route, name=BIN)
    assert status == 200
    table = load_schedule(SHIPPED / BIN)
    assert body["name"] == BIN and body["curve"] == "bin" and body["fitted_steps"] == 50 and body["steps"] == 50
    assert body["source"] == "levels" and body["levels"] == pytest.approx([0.7])
    want = table_tracks(table, table.priorities.tolist(), num_steps=50)
    assert body["background"] == want[0].tolist()
    assert [t["values"] for t in body["tracks"]] == [want[1].tolist()]
    json.dumps(body)  # what the route sends


def test_given_priorities_and_steps(route, folders) -> None:
    save_schedule(table_from_curve("lin", [0.3, 0.8], num_steps=40, description="two levels"), folders / "two.safetensors")
    status, body = answer(route, name="two.safetensors", k="0.5, 0.9,0", steps=7)
    assert status == 200 and body["source"] == "k" and body["steps"] == 7 and body["description"] == "two levels"
    assert [t["k"] for t in body["tracks"]] == [0.5, 0.9, 0.0]
    want = table_tracks(load_schedule(folders / "two.safetensors"), [0.5, 0.9, 0.0], num_steps=7)
    assert [t["values"] for t in body["tracks"]] == [row.tolist() for row in want[1:]]
    assert body["tracks"][2]["values"] == body["background"]  # k = 0: the background's line


def test_fitted_steps_out_of_range_plot_at_fifty(route, folders) -> None:
    table = table_from_curve("bin", [0.7], num_steps=4)
    save_schedule(ScheduleTable(progress=table.progress, timesteps=table.timesteps, priorities=table.priorities,
                                curve="learned", fitted_steps=0), folders / "nofit.safetensors")
    status, body = answer(route, name="nofit.safetensors")
    assert status == 200 and body["steps"] == 50 and body["fitted_steps"] == 0 and len(body["background"]) == 51


@pytest.mark.parametrize("query, fragment", [
    ({"k": "0.5,x"}, "'x' is not a number"),
    ({"k": "1.5"}, "outside [0, 1]"),
    ({"k": "nan"}, "outside [0, 1]"),
    ({"k": ",".join(["0.5"] * 9)}, "at most 8"),
    ({"steps": "0"}, "1..1000"),
    ({"steps": "1001"}, "1..1000"),
    ({"steps": "2.5"}, "whole number"),
    ({"steps": "-3"}, "whole number"),
])
def test_bad_queries_are_refused(route, folders, query, fragment) -> None:
    status, body = answer(route, name=BIN, **query)
    assert status == 400 and fragment in body["error"], body


def test_only_names_the_loader_lists(route, folders, tmp_path) -> None:
    """Names are matched against folder_paths' list before anything is opened: paths never are."""
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for name in ["../x.safetensors", "../../b.safetensors", str(tmp_path / "a" / "b.safetensors"), "/etc/passwd",
                 "..\\x.safetensors", "x.safetensors", "nothere.safetensors", "a\x00.safetensors",
                 str(SHIPPED / BIN), "schedules/" + BIN]:
        status, body = answer(route, name=name)
        assert status == 404 and "is not a schedule file" in body["error"], (name, body)
    assert answer(route)[0] == 400  # no name
    assert answer(route, name="")[0] == 400
    assert answer(route, name="a" * 2000)[0] == 400
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_file_that_does_not_load_gives_the_loaders_message(route, folders) -> None:
    broken = folders / "cut.safetensors"
    broken.write_bytes((SHIPPED / BIN).read_bytes()[:100])
    with pytest.raises(ValueError) as err:
        load_schedule(broken)
    status, body = answer(route, name="cut.safetensors")
    assert status == 422 and body["error"] == str(err.value) and "cut.safetensors" in body["error"]
    pickle = folders / "pickled.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle is never unpickled: refused as a bad header
    status, body = answer(route, name="pickled.safetensors")
    assert status == 422 and "pickled.safetensors" in body["error"]


def test_the_handler_answers_json_with_the_status(route, folders) -> None:
    def request(**query):
        resp = asyncio.run(route.handle_schedule_plot(SimpleNamespace(query=query)))
        return resp.status, json.loads(resp.body)

    status, body = request(name=BIN, k="0.7", steps="5", ignored="1")
    assert status == 200 and body["steps"] == 5 and len(body["tracks"][0]["values"]) == 6
    assert request(name="../x.safetensors")[0] == 404
    assert request(name=BIN, k="7")[0] == 400


def test_registration_adds_one_get_route(route) -> None:
    from aiohttp import web

    server = SimpleNamespace(routes=web.RouteTableDef())
    assert route.register_routes(server) and route.register_routes(server)
    defs = [r for r in server.routes if getattr(r, "path", None) == route.ROUTE]
    assert [(r.method, r.handler) for r in defs] == [("GET", route.handle_schedule_plot)]
    assert route.register_routes(SimpleNamespace()) is False  # no route table


def test_files_are_read_with_the_packs_loader(route, folders) -> None:
    """The route loads through asyndm.schedule_file.load_schedule (a ScheduleTable), nothing else."""
    calls = []
    original = route.load_schedule

    def spy(path):
        calls.append(Path(path).name)
        return original(path)

    route.load_schedule = spy
    try:
        assert answer(route, name=BIN)[0] == 200
    finally:
        route.load_schedule = original
    assert calls == [BIN]
