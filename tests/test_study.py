"""The ablation / cross-centre study on the micro budget with a tiny random encoder: files, resume, refusals,
and the optional nnU-Net row (skipped without ``nnunetv2``; with a stand-in for nnU-Net otherwise); each
row's override file (``configs/ablation/``) builds the network its name says, and the README's ablation
commands parse."""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BUNDLE_ROOT, TINY_DINOV3, TINY_IMAGE_SIZE
from monai.bundle import ConfigParser

from scripts import nnunet_baseline, study
from scripts.data.datalist import load_split
from scripts.evaluation_report import write_evaluation
from scripts.metrics import case_metrics, format_mean_std, summarize
from scripts.networks import AdditiveFusion, CalibratedFusion, EncoderWeightsError, count_parameters

TINY = {"dino_model": "random", "dino_config": TINY_DINOV3, "dino_image_size": TINY_IMAGE_SIZE}
ROWS = ["plain_unet", "full", "without_room_lite"]
PAPER_ROWS = [
    "plain_unet",
    "random_features",
    "dinov2_small",
    "without_calibration",
    "without_room_lite",
    "full",
]


@pytest.fixture
def train_calls(monkeypatch) -> list[str]:
    """Names of the rows trained while the test runs."""
    calls: list[str] = []
    real = study.run.train_row

    def counting(row_dir, *args, **kwargs):
        calls.append(Path(row_dir).name)
        return real(row_dir, *args, **kwargs)

    monkeypatch.setattr(study.run, "train_row", counting)  # where run_row looks it up
    return calls


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("study")
    study.main(str(output), budget="micro", rows=",".join(ROWS), overrides=TINY)
    return output


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def table_line(text: str, label: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {label}")]
    return line


def table_cells(text: str, label: str) -> list[str]:
    """The cells of a Markdown table's line, the label first."""
    return [cell.strip() for cell in table_line(text, label).strip().strip("|").split("|")]


def test_study_config_has_the_paper_rows_and_three_budgets():
    config = study.load_study_config()
    assert config.rows == {row: BUNDLE_ROOT / "configs" / "ablation" / f"{row}.yaml" for row in PAPER_ROWS}
    assert config.external_rows == ("nnunet",) and config.labels["nnunet"] == "nnU-Net (3d_fullres)"
    assert study.plan_study("micro").selected == [*PAPER_ROWS, "nnunet"]  # in the default selection
    assert {"micro", "cpu", "full"} <= set(config.budgets)
    assert all(budget.nnunet_minutes > 0 for budget in config.budgets.values())
    assert config.train_centre == "A" and config.test_centres == ("A", "B", "C")
    for budget in config.budgets.values():
        for row in PAPER_ROWS:  # every row resolves in every budget
            plan = study.plan_study(budget.name, rows=row, config=config)
            assert plan.effective[row]["val_interval"] <= plan.effective[row]["epochs"]


def test_precedence_budget_then_command_then_overrides_then_row_file():
    plan = study.plan_study("micro", dino_model="cmd-model", dinov2_model="/w/dinov2", seed=3, overrides=TINY)
    settings, effective = plan.settings, plan.effective
    for row in PAPER_ROWS:  # the row's file is stacked last on train.yaml and the budget's files
        assert plan.train_files(row)[-1] == BUNDLE_ROOT / "configs" / "ablation" / f"{row}.yaml"
        assert plan.evaluate_files(row)[:-1] == plan.train_files(row)
    assert effective["full"]["dino_model"] == "random"  # overrides beat --dino_model
    assert effective["random_features"]["dino_model"] == "random:1"  # the row's file decides its weights
    assert "dino_model" not in settings["random_features"]  # ... because no override replaces it
    assert effective["dinov2_small"]["dino_model"] == "/w/dinov2"  # --dinov2_model
    assert all(
        settings[row]["dino_config"] == TINY_DINOV3 and settings[row]["seed"] == 3 for row in PAPER_ROWS
    )
    assert settings["nnunet"] == {"method": "nnunet", "budget_minutes": 0.5}  # no override reaches it
    assert effective["plain_unet"]["use_dino"] is False and settings["full"]["roi_size"] == [32, 32, 32]
    default = study.plan_study("micro").effective
    assert default["full"]["dino_model"] == study.DEFAULT_DINO_MODEL
    assert default["dinov2_small"]["dino_model"] == study.DEFAULT_DINOV2_MODEL == "facebook/dinov2-small"
    assert default["random_features"]["dino_model"] == "random:1"
    over = study.plan_study("micro", overrides={"epochs": 2, "roi_size": [16, 16, 16]}).settings["full"]
    assert over["epochs"] == 2 and over["roi_size"] == [16, 16, 16]  # overrides beat the budget


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": "huge"}, "budget"),
        ({"budget": "micro", "rows": "full,no_such_row"}, "rows"),
        ({"budget": "micro", "overrides": {"eval_split": "validation"}}, "eval_split"),
        ({"budget": "micro", "overrides": {"dataset_dir": "/elsewhere"}}, "dataset_dir"),
        ({"budget": "micro", "overrides": {"validate#dataset#data#key": "training"}}, "validate"),
        ({"budget": "micro", "overrides": {"seed": 1}}, "seed"),
        ({"budget": "micro", "overrides": {"val_interval": 2}}, "val_interval"),
        ({"budget": "micro", "seed": -1}, "seed"),
    ],
)
def test_bad_plans_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        study.plan_study(**kwargs)


def row_network(row: str, **plan_kwargs):
    """The network ``row``'s workflows build: its config files and overrides, through the bundle's parser."""
    plan = study.plan_study("micro", rows=row, **plan_kwargs)
    parser = ConfigParser()
    parser.read_config([str(f) for f in plan.train_files(row)])
    parser.update(plan.settings[row])
    return parser.get_parsed_content("network_def")


def calibrated(net) -> bool:
    return len(net.fusions) > 0 and all(isinstance(f, CalibratedFusion) for f in net.fusions)


# row -> what its override file must build (with the tests' tiny random encoder where it names none)
ROW_FILE_BUILDS = {
    "plain_unet": lambda net, n: net.slice_encoder is None and n["dino_path"] == 0 and not net.fusions,
    "random_features": lambda net, n: (
        net.slice_encoder.provenance.source == "random:1" and n["room_lite"] > 0 and calibrated(net)
    ),
    "without_calibration": lambda net, n: (
        len(net.fusions) > 0
        and all(isinstance(f, AdditiveFusion) for f in net.fusions)
        and n["room_lite"] > 0
    ),
    "without_room_lite": lambda net, n: n["room_lite"] == 0 and n["dino_path"] > 0 and calibrated(net),
    "full": lambda net, n: (
        net.slice_encoder.provenance.source == "random:0" and n["room_lite"] > 0 and calibrated(net)
    ),
}


@pytest.mark.parametrize("row", ROW_FILE_BUILDS)
def test_each_row_file_builds_the_network_its_name_says(row):
    net = row_network(row, overrides=TINY)
    assert ROW_FILE_BUILDS[row](net, count_parameters(net))


def test_the_dinov2_row_file_names_dinov2_small_and_the_command_gives_a_local_copy(tiny_dinov2_dir):
    assert ConfigParser.load_config_file(study.load_study_config().rows["dinov2_small"]) == {
        "dino_model": "facebook/dinov2-small"
    }
    overrides = {"dino_config": None, "dino_image_size": TINY_IMAGE_SIZE}
    net = row_network("dinov2_small", dinov2_model=str(tiny_dinov2_dir), overrides=overrides)
    assert net.slice_encoder.provenance.source == str(tiny_dinov2_dir)
    assert type(net.slice_encoder.backbone).__name__ == "Dinov2Model" and calibrated(net)


def test_the_full_row_file_is_train_yaml_as_it_is():
    files = study.load_study_config().rows
    assert ConfigParser.load_config_file(files["full"]) == {}
    alone, stacked = ConfigParser(), ConfigParser()
    alone.read_config(str(study.plan.TRAIN_CONFIG))
    stacked.read_config([str(study.plan.TRAIN_CONFIG), str(files["full"])])
    assert stacked.get() == alone.get()


def test_each_row_file_says_which_row_of_the_paper_it_is():
    config = study.load_study_config()
    for row, file in config.rows.items():
        assert file.read_text().startswith(f'# The paper\'s ablation, row "{config.labels[row]}"'), file


def readme_ablation_section() -> str:
    text = (BUNDLE_ROOT / "README.md").read_text()
    return text.split("### The paper's ablation as override files\n")[1].split("\n## ")[0]


def test_the_readme_ablation_table_names_every_row_file():
    table = [line for line in readme_ablation_section().splitlines() if line.startswith("|")]
    named = [name for line in table for name in re.findall(r"`(configs/ablation/[\w.]+)`", line)]
    rows = study.load_study_config().rows
    assert named == [str(file.relative_to(BUNDLE_ROOT)) for file in rows.values()]


def test_the_readme_ablation_commands_parse():
    """Each ``python -m monai.bundle run`` line of the section, read as fire reads it: the stacked files exist,
    hold the workflow it runs, and give the keys the row's file sets."""
    commands = [
        shlex.split(line)
        for line in readme_ablation_section().splitlines()
        if line.startswith("python -m monai.bundle run ")
    ]
    assert len(commands) >= 2  # training and evaluation
    for args in commands:
        files = ast.literal_eval(args[args.index("--config_file") + 1])
        assert files[0] == "configs/train.yaml", args
        for option in ("--meta_file", "--logging_file"):
            assert (BUNDLE_ROOT / args[args.index(option) + 1]).is_file(), args
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / name) for name in files])
        assert args[args.index("run") + 1] in parser.get(), args  # training / evaluating
        (row_file,) = [name for name in files if name.startswith("configs/ablation/")]
        for key, value in ConfigParser.load_config_file(BUNDLE_ROOT / row_file).items():
            assert parser.get_parsed_content(key) == value, (row_file, key)


def test_an_encoder_that_cannot_be_loaded_stops_the_study_before_anything(tmp_path, monkeypatch, train_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "weights" / "no" / "such-model")  # a local path: no network is tried
    overrides = {"dino_config": TINY_DINOV3, "dino_image_size": TINY_IMAGE_SIZE}
    output = tmp_path / "study"
    with pytest.raises(EncoderWeightsError, match=r"(?s)\['full'\].*--rows plain_unet.*such-model"):
        study.main(
            str(output), budget="micro", rows="plain_unet,full", dino_model=missing, overrides=overrides
        )
    assert train_calls == [] and not output.exists()


def test_micro_study_writes_every_file_and_selected_row(micro_study):
    for name in ("study.json", "results.csv", "ablation.md", "cross_centre.md"):
        assert (micro_study / name).is_file()
    for centre in "ABC":
        assert (micro_study / "data" / centre / "dataset.json").is_file()
    assert list((micro_study / "embedding_cache").rglob("*.npy"))  # DINO rows shared the disk cache

    rows = read_csv(micro_study / "results.csv")
    in_study_order = [row for row in PAPER_ROWS if row in ROWS]
    assert [(r["row"], r["centre"]) for r in rows] == [(row, c) for row in in_study_order for c in "ABC"]
    numeric = [
        c for c in study.CSV_COLUMNS if c.endswith(("_mean", "_std", "_seconds", "_rate", "_per_case"))
    ]
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in numeric), row
        assert int(row["n_cases"]) == 1 and int(row["failures_k"]) <= 1 and int(row["trainable_params"]) > 0
        if row["row"] == "plain_unet":
            assert row["encoder_source"] == "none" and row["encoder_is_random"] == "False"
        else:
            assert row["encoder_source"] == "random:0" and row["encoder_is_random"] == "True"
    params = {r["row"]: int(r["trainable_params"]) for r in rows}
    assert params["plain_unet"] < params["without_room_lite"] < params["full"]

    ablation = (micro_study / "ablation.md").read_text()
    assert "± " in table_line(ablation, "DINO-3DRA (full) †")
    assert "/1 |" in table_line(ablation, "Plain U-Net")
    for label in ("Random features", "DINOv2-small", "w/o calibration"):
        assert table_line(ablation, label).startswith(f"| {label} | not run |")
    for note in ("Budget `micro`", "RANDOM frozen encoder", "HD95 = 100 mm", "n test cases"):
        assert note in ablation
    cross = (micro_study / "cross_centre.md").read_text()
    assert table_line(cross, "w/o Room-Lite †").count("±") == 3 and "B, C unseen" in cross
    done = json.loads((micro_study / "rows" / "full" / "done.json").read_text())
    assert done["encoder"]["source"] == "random:0" and set(done["centres"]) == {"A", "B", "C"}


def assert_results_agree_with_row_files(output: Path) -> None:
    """Each line of results.csv holds its own (row, centre)'s figures: those of the summary.json and
    per_case.csv that evaluation wrote in rows/<row>/eval_<centre>/, and of the row's done.json; the two
    tables print the same summaries."""
    config = study.load_study_config()
    lines = read_csv(output / "results.csv")
    assert lines
    for line in lines:
        row, centre = line["row"], line["centre"]
        eval_dir = output / "rows" / row / f"eval_{centre}"
        summary = json.loads((eval_dir / "summary.json").read_text())
        cases = read_csv(eval_dir / "per_case.csv")
        done = json.loads((output / "rows" / row / "done.json").read_text())
        what = f"{row}/{centre}"
        assert line["label"] == config.labels[row] and line["in_centre"] == str(centre == config.train_centre)
        assert int(line["n_cases"]) == summary["n_cases"] == len(cases), what
        for name in ("aneurysm", "vessel"):
            for metric in ("dice", "hd95"):
                stats = summary["classes"][name][metric]
                values = [float(case[f"{name}_{metric}"]) for case in cases]
                assert (stats["mean"], stats["std"]) == pytest.approx((np.mean(values), np.std(values))), what
                for part in ("mean", "std"):
                    assert float(line[f"{name}_{metric}_{part}"]) == pytest.approx(stats[part], abs=1e-6), (
                        what
                    )
        # the failure definition, case by case: aneurysm Dice < 0.5
        failed = [float(case["aneurysm_dice"]) < 0.5 for case in cases]
        assert [case["failure"] == "True" for case in cases] == failed, what
        assert int(line["failures_k"]) == summary["failure"]["k"] == sum(failed), what
        assert float(line["failure_rate"]) == pytest.approx(sum(failed) / len(cases), abs=1e-6), what
        hits, true_components, false_positives = (
            sum(int(case[f"aneurysm_{key}"]) for case in cases)
            for key in ("hits", "true_components", "false_positives")
        )
        assert (summary["detection"]["hits"], summary["detection"]["true_components"]) == (
            hits,
            true_components,
        )
        if true_components:
            assert float(line["detection_sensitivity"]) == pytest.approx(hits / true_components, abs=1e-6)
        else:
            assert line["detection_sensitivity"] == ""  # no sensitivity without a true aneurysm, never NaN
        assert float(line["detection_fp_per_case"]) == pytest.approx(false_positives / len(cases), abs=1e-6)
        assert done["centres"][centre]["summary"] == summary, what
        if done["trainable_params"] is None:  # not counted (nnU-Net)
            assert line["trainable_params"] == "", what
        else:
            assert int(line["trainable_params"]) == done["trainable_params"], what
        assert line["skip_reason"] == "", what
        assert float(line["train_seconds"]) == pytest.approx(done["train_seconds"], abs=0.051)
        assert float(line["eval_seconds"]) == pytest.approx(
            done["centres"][centre]["eval_seconds"], abs=0.051
        )
        assert (line["budget"], int(line["seed"])) == (done["budget"], done["seed"])

    ablation, cross = (output / "ablation.md").read_text(), (output / "cross_centre.md").read_text()
    for row in {line["row"] for line in lines}:
        summaries = {
            c: json.loads((output / "rows" / row / f"eval_{c}" / "summary.json").read_text())
            for c in config.test_centres
        }
        own = summaries[config.train_centre]  # the ablation is on the training centre
        cells = table_cells(ablation, config.labels[row])
        assert cells[1] == format_mean_std(own["classes"]["aneurysm"]["dice"], 3), row
        assert cells[2] == format_mean_std(own["classes"]["aneurysm"]["hd95"], 2), row
        assert cells[3] == format_mean_std(own["classes"]["vessel"]["dice"], 3), row
        assert cells[4] == f"{own['failure']['k']}/{own['failure']['n']}", row
        cells = table_cells(cross, config.labels[row])
        for index, centre in enumerate(config.test_centres):
            summary = summaries[centre]
            assert cells[1 + 2 * index] == format_mean_std(summary["classes"]["aneurysm"]["dice"], 3), row
            assert cells[2 + 2 * index] == f"{summary['failure']['k']}/{summary['failure']['n']}", row


def test_results_csv_and_tables_agree_with_each_row_s_own_files(micro_study):
    assert_results_agree_with_row_files(micro_study)


def scored_cases(row_index: int, centre_index: int) -> list[dict]:
    """Three cases scored by scripts.metrics, different for every (row, centre): aneurysm Dice 1, 3/4 and
    1/4 (one failure of three), ``row_index + centre_index + (0, 1, 2)`` false aneurysm components, and a
    spacing of their own along the aneurysm's shift (so HD95 differs)."""
    spacing = (0.3 + 0.1 * row_index + 0.03 * centre_index, 0.5, 0.5)
    label = np.zeros((16, 16, 16), np.uint8)
    label[2:14, 7:9, 7:9] = 1
    label[4:8, 9:13, 6:10] = 2  # a 4^3 aneurysm beside the vessel
    cases = []
    for index, shift in enumerate((0, 1, 3)):
        pred = np.where(label == 2, 0, label).astype(np.uint8)
        pred[4 + shift : 8 + shift, 9:13, 6:10] = 2
        for speck in range(row_index + centre_index + index):  # separate one-voxel false aneurysms
            pred[0, 2 * speck, 0] = 2
        cases.append({"case": f"case_{index}", **case_metrics(pred, label, spacing)})
    return cases


def test_results_csv_holds_each_row_and_centre_s_own_summary(micro_study, tmp_path):
    """The same check on summaries of three cases that differ for every (row, centre): failures k != n,
    false positives per case != their count, no two centres alike."""
    output = tmp_path / "study"
    shutil.copytree(micro_study, output)
    config = study.load_study_config()
    for row_index, row in enumerate(ROWS):
        done_path = output / "rows" / row / "done.json"
        done = json.loads(done_path.read_text())
        for centre_index, centre in enumerate(config.test_centres):
            cases = scored_cases(row_index, centre_index)
            summary = summarize(cases)
            eval_dir = output / "rows" / row / f"eval_{centre}"
            with open(eval_dir / "per_case.csv", "w", newline="") as handle:  # as evaluation writes it
                writer = csv.DictWriter(handle, fieldnames=list(cases[0]))
                writer.writeheader()
                writer.writerows(cases)
            (eval_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            done["centres"][centre].update(n_cases=len(cases), summary=json.loads(json.dumps(summary)))
        done_path.write_text(json.dumps(done, indent=2))
    study.write_tables(output, study.plan_study("micro", rows=",".join(ROWS), overrides=TINY))
    lines = read_csv(output / "results.csv")
    assert len(lines) == len(ROWS) * len(config.test_centres)
    assert {line["failures_k"] for line in lines} == {"1"} and {line["n_cases"] for line in lines} == {"3"}
    assert len({line["aneurysm_hd95_mean"] for line in lines}) == len(lines)  # every line its own
    assert_results_agree_with_row_files(output)


def test_an_interrupted_study_resumes_without_retraining_finished_rows(micro_study, tmp_path, train_calls):
    output = tmp_path / "study"
    shutil.copytree(micro_study, output)
    plain_done = output / "rows" / "plain_unet" / "done.json"
    before = plain_done.stat().st_mtime_ns
    counting = study.run.train_row

    def interrupted(row_dir, *args, **kwargs):
        counting(row_dir, *args, **kwargs)
        raise KeyboardInterrupt  # after training, before evaluation and done.json

    study.run.train_row = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            study.main(str(output), budget="micro", rows="plain_unet,without_calibration", overrides=TINY)
    finally:
        study.run.train_row = counting
    assert train_calls == ["without_calibration"]  # plain_unet was finished: skipped
    assert not (output / "rows" / "without_calibration" / "done.json").exists()
    assert (output / "rows" / "without_calibration" / "models" / "model.pt").is_file()

    train_calls.clear()
    study.main(str(output), budget="micro", rows="plain_unet,without_calibration", overrides=TINY)
    assert train_calls == ["without_calibration"]  # plain_unet was finished: not retrained
    assert plain_done.stat().st_mtime_ns == before
    assert (output / "rows" / "without_calibration" / "done.json").is_file()
    ablation = (output / "ablation.md").read_text()
    assert "not run" not in table_line(ablation, "w/o calibration †")
    assert "not run" not in table_line(ablation, "DINO-3DRA (full) †")  # finished earlier, not selected now
    assert len(read_csv(output / "results.csv")) == 4 * 3


def test_finished_rows_with_other_settings_count_as_not_run(micro_study, tmp_path):
    output = tmp_path / "study"
    shutil.copytree(micro_study, output)
    plan = study.plan_study("micro", overrides={**TINY, "learning_rate": 0.1})
    assert study.run.finished_record(output, plan, "full") is None
    assert "| Plain U-Net | not run |" in study.write_tables(output, plan)
    assert study.run.finished_record(output, study.plan_study("micro", overrides=TINY), "full") is not None


def test_an_output_dir_stays_bound_to_its_data(micro_study, tmp_path):
    output = tmp_path / "study"
    shutil.copytree(micro_study, output)
    with pytest.raises(ValueError, match="seed"):
        study.main(str(output), budget="micro", rows="plain_unet", seed=1, overrides=TINY)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda raw: raw["budgets"]["micro"].pop("nnunet_minutes"), "nnunet_minutes"),
        (lambda raw: raw["budgets"]["cpu"].update(nnunet_minutes=0), "nnunet_minutes"),
        (lambda raw: raw.update(external_rows=["nnunet", "swin_unetr"]), "external_rows"),
        (lambda raw: raw["rows"].update(nnunet="configs/ablation/full.yaml"), "twice"),
        (
            lambda raw: raw["rows"].update(full="configs/ablation/no_such_row.yaml"),
            "no_such_row.yaml.*not found",
        ),
        (lambda raw: raw["rows"].update(full=yaml.__file__), "not found"),  # a file outside the bundle
        (lambda raw: raw["rows"].update(full={"use_dino": False}), "override file"),
    ],
)
def test_bad_rows_are_refused_naming_the_file(tmp_path, edit, match):
    raw = yaml.safe_load(study.plan.STUDY_CONFIG.read_text())
    edit(raw)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=rf"study\.yaml.*{match}"):
        study.load_study_config(path)


def test_a_row_file_that_sets_where_data_or_results_go_is_refused(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    monkeypatch.setattr(study.plan, "BUNDLE_ROOT", root)
    (root / "bad.yaml").write_text("use_dino: false\nvalidate#dataset#data#key: training\n")
    raw = yaml.safe_load(study.plan.STUDY_CONFIG.read_text())
    raw["rows"] = {"bad": "bad.yaml"}
    raw["budgets"] = {"micro": raw["budgets"]["micro"]}  # no config_files under this root
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"bad\.yaml sets 'validate#dataset#data#key'"):
        study.load_study_config(path)


def test_without_nnunetv2_the_nnunet_row_is_skipped_with_the_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # `import nnunetv2` raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("run_nnunet was called without nnunetv2")

    monkeypatch.setattr(nnunet_baseline, "run_nnunet", never)
    output = tmp_path / "study"
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        tables = study.main(str(output), budget="micro", rows="nnunet")  # only nnunet: still no error
    reason = "nnunetv2 is not installed"
    assert any(reason in r.getMessage() and "pip install" in r.getMessage() for r in caplog.records)
    assert not (output / "data").exists() and not (output / "rows").exists()  # nothing to run: no data

    lines = read_csv(output / "results.csv")
    assert [(line["row"], line["centre"]) for line in lines] == [("nnunet", c) for c in "ABC"]
    for line in lines:
        assert reason in line["skip_reason"] and "pip install" in line["skip_reason"]
        assert line["aneurysm_dice_mean"] == line["n_cases"] == ""  # no figures
    for name in ("ablation.md", "cross_centre.md"):
        text = (output / name).read_text()
        assert table_line(text, "nnU-Net (3d_fullres)").startswith(
            f"| nnU-Net (3d_fullres) | skipped: {reason}"
        )
        assert table_line(text, "Plain U-Net").startswith("| Plain U-Net | not run |")  # not selected
        assert text in tables


def fake_run_nnunet(calls: list[dict]):
    """A stand-in for :func:`scripts.nnunet_baseline.run_nnunet`: writes each test datalist's evaluation
    (one scored record per test case, different for every centre) into ``work_dir/eval_<name>``, as the real
    one does, and returns a summary of the real one's form; ``calls`` gets its arguments."""

    def run_nnunet(work_dir, train_dataset_dir, test_datalists, **kwargs):
        calls.append({"work_dir": work_dir, "train_dataset_dir": train_dataset_dir, **kwargs})
        calls[-1]["test_datalists"] = dict(test_datalists)
        test = {}
        for index, (name, datalist) in enumerate(test_datalists.items()):
            cases = scored_cases(len(ROWS), index)
            records = [
                {**cases[i % len(cases)], "case": Path(entry["label"]).name}
                for i, entry in enumerate(load_split(datalist, "test"))
            ]
            summary = write_evaluation(records, Path(work_dir) / f"eval_{name}")
            test[name] = {"prediction_s": 0.5 + index, "summary": summary}
        training = {"epochs": 1, "iterations": 10, "seconds": 2.0}
        return {
            "budget_minutes": kwargs["budget_minutes"],
            "preprocessing_s": 1.0,
            "training": training,
            "use_mirroring": False,
            "test": test,
        }

    return run_nnunet


def test_the_nnunet_row_trains_on_the_training_centre_and_is_scored_like_the_others(
    micro_study, tmp_path, monkeypatch, train_calls
):
    output = tmp_path / "study"
    shutil.copytree(micro_study, output)
    calls: list[dict] = []
    monkeypatch.setattr(nnunet_baseline, "require_nnunet", lambda: None)  # "installed"
    monkeypatch.setattr(nnunet_baseline, "run_nnunet", fake_run_nnunet(calls))
    study.main(str(output), budget="micro", rows="plain_unet,nnunet", overrides=TINY)

    config = study.load_study_config()
    data = output.resolve() / "data"
    assert calls == [
        {
            "work_dir": output.resolve() / "rows" / "nnunet",
            "train_dataset_dir": str(data / "A"),
            "test_datalists": {c: str(data / c / "dataset.json") for c in "ABC"},
            "budget_minutes": config.budgets["micro"].nnunet_minutes,
        }
    ]
    assert train_calls == []  # plain_unet was finished; nnunet is not train.yaml

    lines = [line for line in read_csv(output / "results.csv") if line["row"] == "nnunet"]
    assert [line["centre"] for line in lines] == list("ABC")
    for line in lines:
        assert (line["encoder_source"], line["encoder_sha256"], line["encoder_is_random"]) == (
            "none",
            "",
            "False",
        )
        assert float(line["train_seconds"]) == 3.0 and line["trainable_params"] == ""
    assert [float(line["eval_seconds"]) for line in lines] == [0.5, 1.5, 2.5]
    assert_results_agree_with_row_files(output)  # its lines and table cells are its eval_<centre> files
    ablation = (output / "ablation.md").read_text()
    assert table_line(ablation, "nnU-Net (3d_fullres) |").endswith("| 3 s |")
    assert "nnU-Net (3d_fullres): nnU-Net v2's own pipeline" in ablation
    assert "nnU-Net (3d_fullres)" in (output / "cross_centre.md").read_text()

    study.main(str(output), budget="micro", rows="nnunet", overrides=TINY)
    assert len(calls) == 1  # finished: reused, not rerun
