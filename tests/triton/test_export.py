"""``kimchi-edge export triton``: the repository's files, configs against the manifest, and the gate's refusals.

No server here (tests/triton/test_served.py serves the repository for real).  Configs are read back with an
independent text-format reader (tests/triton/pbtxt.py) and, where the Triton venv exists, with Triton's own
ModelConfig protobuf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kimchi_edge.runtime.errors import BundleError, UsageError
from kimchi_edge.runtime.manifest import read_manifest

from kimchi_edge.cli import main

from ..conftest import COLOR_LABELS
from .checks import config_problems, ensemble_problems, protobuf_problems, read_config
from .conftest import export
from .harness import triton_venv
from .pbtxt import one, parse

ROLES = {"classifier": "ensemble", "classifier_preprocess": "preprocess", "classifier_onnx": "onnxruntime",
         "classifier_postprocess": "postprocess"}


@pytest.fixture
def default_repo(color_bundle, tmp_path) -> Path:
    export(color_bundle, tmp_path / "repo")
    return tmp_path / "repo"


def test_every_config_declares_what_the_manifest_says(default_repo, color_bundle):
    manifest = read_manifest(color_bundle)
    assert sorted(p.name for p in default_repo.iterdir()) == sorted(ROLES)
    for name, role in ROLES.items():
        config = read_config(default_repo / name)
        assert one(config, "name") == name
        assert config_problems(config, manifest, role) == [], name
    assert ensemble_problems(default_repo, "classifier") == []
    onnx = read_config(default_repo / "classifier_onnx")
    (image,) = onnx["input"]
    # the colour bundle: uint8 NHWC 32x32, three classes
    assert (one(image, "name"), one(image, "data_type"), image["dims"], one(image, "format")) == ("image", "TYPE_UINT8", [32, 32, 3], "FORMAT_NHWC")
    assert one(onnx, "max_batch_size") == 8
    assert one(one(onnx, "dynamic_batching"), "max_queue_delay_microseconds") == 1000
    # the gate passed the ONNX on the CPU only: auto keeps the onnxruntime model there
    assert [one(g, "kind") for g in onnx["instance_group"]] == ["KIND_CPU"]
    assert (default_repo / "classifier_onnx" / "1" / "model.onnx").read_bytes() == (color_bundle / "model.onnx").read_bytes()


def test_configs_parse_with_tritons_own_protobuf(default_repo):
    python = triton_venv() / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"Triton's ModelConfig protobuf comes with tritonclient[grpc] in the Triton venv ({triton_venv()} is missing)")
    configs = sorted(default_repo.glob("*/config.pbtxt"))
    assert protobuf_problems(python, configs) == {}
    broken = default_repo / "classifier_onnx" / "config.pbtxt"
    broken.write_text(broken.read_text().replace("TYPE_UINT8", "TYPE_UINT_8"))
    assert "TYPE_UINT_8" in protobuf_problems(python, [broken])[str(broken)]


def test_a_missing_dtype_or_wrong_dims_is_caught(default_repo, color_bundle):
    manifest = read_manifest(color_bundle)
    text = (default_repo / "classifier_onnx" / "config.pbtxt").read_text()
    no_dtype = parse(text.replace("    data_type: TYPE_UINT8\n", "", 1))
    assert any("data_type None, expected TYPE_UINT8" in p for p in config_problems(no_dtype, manifest, "onnxruntime"))
    swapped = parse(text.replace("dims: [ 32, 32, 3 ]", "dims: [ 3, 32, 32 ]"))
    assert any("dims [3, 32, 32], expected [32, 32, 3]" in p for p in config_problems(swapped, manifest, "onnxruntime"))
    float_input = parse(text.replace("TYPE_UINT8", "TYPE_FP32"))
    assert config_problems(float_input, manifest, "onnxruntime")


def test_labels_file_is_the_exact_unicode_text_in_vocab_order(default_repo):
    want = "".join(f"{lab}\n" for lab in COLOR_LABELS).encode("utf-8")
    labelled = []
    for config_path in default_repo.glob("*/config.pbtxt"):
        config = parse(config_path.read_text(encoding="utf-8"))
        for out in config.get("output", []):
            if one(out, "label_filename"):
                labelled.append(config_path.parent.name)
                assert (config_path.parent / one(out, "label_filename")).read_bytes() == want
    assert sorted(labelled) == ["classifier", "classifier_onnx", "classifier_postprocess"]


def test_preprocessing_step_is_the_runtimes_code_reading_the_bundles_manifest(default_repo, color_bundle):
    step = default_repo / "classifier_preprocess"
    source = (step / "1" / "model.py").read_text()
    assert "from kimchi_edge.runtime.preprocess import Preprocessor" in source
    assert "Preprocessor(manifest.preprocessing" in source
    for copied in ("resize(", "BILINEAR", "crop(", "mean", "/ 255"):  # nothing of the preprocessing is re-typed
        assert copied not in source
    assert (step / "manifest.json").read_bytes() == (color_bundle / "manifest.json").read_bytes()
    compile(source, "model.py", "exec")
    for name in ("classifier_postprocess",):
        compile((default_repo / name / "1" / "model.py").read_text(), "model.py", "exec")


def test_export_record_names_the_bundle_artifact_and_verdict(default_repo, color_bundle):
    record = json.loads((default_repo / "classifier" / "export.json").read_text(encoding="utf-8"))
    (art,) = record["artifacts"]
    assert (art["name"], art["sha256"], art["gate"]["status"]) == ("onnx-fp32", read_manifest(color_bundle).artifact("onnx-fp32").sha256, "pass")
    assert record["ungated"] == [] and record["classifier"] == "classifier_onnx"
    assert record["models"] == ROLES


def test_ungated_bundle_is_refused_in_one_line_naming_gate_md(ungated_color_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["export", "triton", str(ungated_color_bundle), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gate.md" in err and "--allow-ungated" in err and "never run" in err
    assert not out.exists() or not any(out.iterdir())

    assert main(["export", "triton", str(ungated_color_bundle), str(out), "--allow-ungated", "--classify-with", "python"]) == 0
    text = capsys.readouterr().out
    assert "UNGATED: the accuracy gate has never run on this bundle" in text
    record = json.loads((out / "classifier" / "export.json").read_text(encoding="utf-8"))
    assert record["ungated"] and record["artifacts"][0]["gate"] is None
    params = {one(p, "key"): one(one(p, "value"), "string_value") for p in read_config(out / "classifier_onnx_python")["parameters"]}
    assert params["allow_ungated"] == "true" and params["kimchi_edge_artifact"] == "onnx-fp32"


def test_gated_tensorrt_engine_becomes_a_tensorrt_plan_model(trt_bundle, tmp_path):
    plan = export(trt_bundle, tmp_path / "repo")
    repo = tmp_path / "repo"
    config = read_config(repo / "classifier_trt")
    assert config_problems(config, read_manifest(trt_bundle), "tensorrt") == []
    assert one(config, "max_batch_size") == 4  # the engine's profile allows 4, below the default 8
    assert (repo / "classifier_trt" / "1" / "model.plan").read_bytes() == (trt_bundle / "model.fp16.engine").read_bytes()
    assert plan.engine.name == "trt-fp16"
    assert any("trt-int8 not exported" in n and "gate.md" in n for n in plan.notes)
    steps = read_config(repo / "classifier")["ensemble_scheduling"][0]["step"]
    assert [one(s, "model_name") for s in steps][1] == "classifier_onnx"  # ONNX by default: it runs anywhere

    export(trt_bundle, tmp_path / "trt", classify_with="tensorrt")
    steps = read_config(tmp_path / "trt" / "classifier")["ensemble_scheduling"][0]["step"]
    assert [one(s, "model_name") for s in steps][1] == "classifier_trt"
    assert ensemble_problems(tmp_path / "trt", "classifier") == []
    assert one(read_config(tmp_path / "trt" / "classifier"), "max_batch_size") == 4


def test_ungated_engine_asked_for_is_refused(trt_bundle, tmp_path):
    with pytest.raises(BundleError, match=r"trt-int8 failed: loses 12.0 points.*gate\.md"):
        export(trt_bundle, tmp_path / "repo", engine="trt-int8")
    assert not (tmp_path / "repo").exists()
    plan = export(trt_bundle, tmp_path / "repo", engine="trt-int8", allow_ungated=True)
    assert plan.engine.name == "trt-int8" and any("trt-int8 failed" in u for u in plan.ungated)


def test_gpu_instances_need_a_gate_pass_on_cuda(color_bundle, tmp_path):
    with pytest.raises(BundleError, match=r"CUDAExecutionProvider.*gate\.md"):
        export(color_bundle, tmp_path / "repo", device="gpu")
    export(color_bundle, tmp_path / "repo", device="gpu", allow_ungated=True)
    assert [one(g, "kind") for g in read_config(tmp_path / "repo" / "classifier_onnx")["instance_group"]] == ["KIND_GPU"]


def test_tampered_onnx_is_refused(color_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(color_bundle, bundle)
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="has been modified"):
        export(bundle, tmp_path / "repo")


def test_existing_models_are_kept_and_ours_replaced_only_with_force(color_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "someone_elses_model" / "1").mkdir(parents=True)
    export(color_bundle, repo)
    with pytest.raises(UsageError, match="--force"):
        export(color_bundle, repo)
    assert main(["export", "triton", str(color_bundle), str(repo), "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pipeline"] == "classifier" and doc["models"]["classifier_onnx"] == "onnxruntime"
    assert (repo / "someone_elses_model" / "1").is_dir()
    assert not [p for p in repo.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_bad_options_exit_2(color_bundle, tmp_path, capsys):
    assert main(["export", "triton", str(color_bundle), str(tmp_path / "r"), "--name", "has space"]) == 2
    assert "model name 'has space'" in capsys.readouterr().err
    assert main(["export", "triton", str(color_bundle), str(tmp_path / "r"), "--classify-with", "tensorrt"]) == 2
    assert "needs a gated TensorRT engine" in capsys.readouterr().err


def test_exports_where_only_the_runtime_is_installed(color_bundle, tmp_path):
    """No torch, fastai, TensorRT or onnx: the exporter reads the manifest and the ONNX with ONNX Runtime only."""
    from tests.convert.test_isolation import run_blocked

    proc = run_blocked(
        """
        import json, sys
        from kimchi_edge.cli import main
        code = main(["export", "triton", sys.argv[1], sys.argv[2], "--quiet"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "fastai", "tensorrt", "onnx", "polygraphy", "tritonclient"))
        print(json.dumps([code, heavy]))
        """,
        str(color_bundle), str(tmp_path / "repo"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, []]
    assert (tmp_path / "repo" / "classifier" / "config.pbtxt").is_file()
