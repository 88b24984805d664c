"""The plan (ngdiff_ds/plan/) against independent counts: DeepSpeed's own ZeRO-3 estimator,
HF models built on the meta device, published parameter totals, the tensors autograd saves,
and hand computations; and launch/plan.py's output and refusals. No DeepSpeed launch.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from ngdiff_ds.plan import (MODES, PRESETS, PROBE_MULTIPLES, PROBE_PERIOD, PROBE_TASKS,
                            ModelDims, PlanSettings, ZeroAssumptions, communication_bytes,
                            count_parameters, load_model, lora_tensors, make_plan,
                            memory_breakdown, model_state_bytes, model_tensors,
                            saved_activation_bytes)
from tests.conftest import PYTHON, REPO

# Totals published with the models (the HF model cards' / configs' parameter counts).
PUBLISHED_PARAMETERS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
}

# Two smaller shapes: a Llama-3.2-1B-like model with tied embeddings and a 160M one.
EXTRA_CONFIGS = {
    "tied-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    tie_word_embeddings=True),
    "mha-160m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                     tie_word_embeddings=False),
}


def write_config(directory, **config) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return str(directory)


def hf_config(dims: ModelDims):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
                       intermediate_size=dims.intermediate_size,
                       num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
                       num_key_value_heads=dims.num_kv_heads,
                       tie_word_embeddings=dims.tie_word_embeddings)


def meta_model_params(dims: ModelDims) -> tuple[int, int]:
    """(total, largest module) of the real HF model, counted as DeepSpeed's ``model_to_params``
    does (that function dedups by data_ptr, which is 0 for every meta tensor)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(dims))
    total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_configs")
    return {name: write_config(root / name, **config) for name, config in EXTRA_CONFIGS.items()}


def settings_for(name: str, model_dirs=None, **values) -> PlanSettings:
    if name in PRESETS:
        return PlanSettings(preset=name, **values)
    return PlanSettings(config=model_dirs[name], **values)


# ----- (a) model states against DeepSpeed's estimator ------------------------------------

OFFLOAD = {"none": (False, False), "optimizer": (True, False), "optimizer+params": (True, True)}


@pytest.mark.parametrize("name", [*PRESETS, *EXTRA_CONFIGS])
@pytest.mark.parametrize("offload", OFFLOAD)
def test_model_states_agree_with_deepspeed_estimator(name, offload, model_dirs):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu_offload, offload_params = OFFLOAD[offload]
    settings = settings_for(name, model_dirs, offload=cpu_offload, offload_params=offload_params)
    model = load_model(settings)
    total, largest = meta_model_params(model[0])
    for gpus_per_node, nodes in ((1, 1), (8, 1), (8, 4), (8, 8)):
        # DeepSpeed counts fp16 params, fp32 grads, fp32 master and Adam's moments (18 bytes a
        # parameter), the largest layer's 16-bit param and grad, and on offload the host side
        # per node; its 1.5 safety factor is left out to compare like with like.
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=cpu_offload,
            cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.0)
        ours = model_state_bytes(model, settings, gpus_per_node, nodes)
        assert ours["gpu"] == pytest.approx(ds_gpu, rel=0.05), (gpus_per_node, nodes)
        if cpu_offload:
            assert ours["cpu_per_node"] == pytest.approx(ds_cpu, rel=0.05), (gpus_per_node, nodes)


# ----- (b) parameter counts --------------------------------------------------------------

def hand_count(dims: ModelDims) -> int:
    """Per layer q, k, v, o, three MLP matrices and two norms; embedding, head, final norm."""
    h, q, kv, i = dims.hidden_size, dims.q_dim, dims.kv_dim, dims.intermediate_size
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    heads = 1 if dims.tie_word_embeddings else 2
    return dims.num_layers * layer + heads * dims.vocab_size * h + h


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts(name):
    dims = PRESETS[name]
    counted = count_parameters(model_tensors(dims))
    assert counted == PUBLISHED_PARAMETERS[name]
    assert counted == hand_count(dims)
    assert meta_model_params(dims)[0] == counted


def test_config_dir_counts_like_hf(model_dirs):
    for name in EXTRA_CONFIGS:
        dims, tensors = load_model(settings_for(name, model_dirs))
        assert count_parameters(tensors) == meta_model_params(dims)[0] == hand_count(dims)


# ----- (c) communication of a tiny model, by hand -----------------------------------------

TINY = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1)
# Norms (8 elements) persistent, everything else gathered per pass.
TINY_ZERO = ZeroAssumptions(stage3_param_persistence_threshold=10)


def tiny_settings(tmp_path, **values) -> PlanSettings:
    return PlanSettings(config=write_config(tmp_path / "tiny", **TINY), gpus_per_node=3,
                        nodes=(1,), zero=TINY_ZERO, **values)


def test_tiny_communication_by_hand(tmp_path):
    # 3 ranks, bf16. Parameters (head_dim 4, kv_dim 4): embed and lm_head 256 each; per layer
    # q 64, k 32, v 32, o 64, gate/up/down 128 each, two norms of 8; a final norm of 8.
    # Padded per-rank slices: 256 -> 86, 64 -> 22, 32 -> 11, 128 -> 43, 8 -> 3.
    #   gathered (non-persistent): 2 * 86 + 2 * (22 + 11 + 11 + 22 + 3 * 43) = 562 elements
    #   persistent (5 norms): 5 * 3 = 15 elements
    # A ring collective sends (N - 1) slices: gather 2 * 2 bytes * 562 = 2248 bytes, persistent
    # re-gather 2 * 2 * 15 = 60, reduce-scatter of all 577 trainable 2 * 2 * 577 = 2308.
    # All-reduce of 7 float64: 2 * 2/3 * 8 * 7 = 224/3.
    settings = tiny_settings(tmp_path)
    model = load_model(settings)
    expected = {
        "ngdiff": dict(all_gather_forward=2 * 2248, all_gather_backward=2 * 2248,
                       all_gather_probes=0, all_gather_persistent=60,
                       reduce_scatter=2 * 2308, all_reduce=224 / 3),
        # fits every 8 steps: 3 probe forwards, 4 persistent re-gathers, 3 more numbers
        "ngdiff_adaptive": dict(all_gather_forward=2 * 2248, all_gather_backward=2 * 2248,
                                all_gather_probes=3 / 8 * 2248,
                                all_gather_persistent=60 + 4 / 8 * 60,
                                reduce_scatter=2 * 2308, all_reduce=2 * 2 / 3 * 8 * (7 + 3 / 8)),
        "shared_forward": dict(all_gather_forward=2248, all_gather_backward=2 * 2248,
                               all_gather_probes=0, all_gather_persistent=60,
                               reduce_scatter=2 * 2308, all_reduce=224 / 3),
        "gdiff": dict(all_gather_forward=2248, all_gather_backward=2248, all_gather_probes=0,
                      all_gather_persistent=60, reduce_scatter=2308, all_reduce=0),
    }
    for mode, parts in expected.items():
        volume = communication_bytes(model, settings, mode, world_size=3)
        for part, value in parts.items():
            assert volume[part] == pytest.approx(value), (mode, part)
        assert volume["total"] == pytest.approx(sum(parts.values()))
        assert communication_bytes(model, settings, mode, world_size=1)["total"] == 0


def test_tiny_communication_scales_with_micro_batches(tmp_path):
    settings = tiny_settings(tmp_path, grad_accum_steps=2)
    volume = communication_bytes(load_model(settings), settings, "ngdiff", world_size=3)
    assert volume["all_gather_forward"] == volume["all_gather_backward"] == 4 * 2248
    assert volume["reduce_scatter"] == 4 * 2308
    assert volume["all_gather_persistent"] == 60  # once per optimizer step, not per pass


def test_tiny_memory_by_hand(tmp_path):
    settings = tiny_settings(tmp_path)
    model = load_model(settings)
    ngdiff = memory_breakdown(model, settings, "ngdiff", world_size=3).as_dict()
    # 577 padded elements per rank: 2-byte weights, fp32 master, 2 fp32 moments, fp32 grads.
    assert {k: ngdiff["gpu"][k] for k in ("weights", "master", "moments", "gradients",
                                          "ngdiff_extra")} == {
        "weights": 1154, "master": 2308, "moments": 4616, "gradients": 2308,
        "ngdiff_extra": 2308}
    assert memory_breakdown(model, settings, "gdiff", world_size=3).gpu["ngdiff_extra"] == 0
    transient = max(ngdiff["gpu"]["gathered"] + ngdiff["gpu"]["activations"],
                    ngdiff["gpu"]["step_buffer"])
    # the gradient bucket: all reduce_bucket_size (5e7) elements in bf16, allocated at start
    assert ngdiff["gpu"]["reduce_bucket"] == 2 * 50_000_000
    assert ngdiff["gpu_peak"] == 1154 + 2308 + 4616 + 2308 + 2308 + 2 * 50_000_000 + transient


def test_the_optimizer_step_counts_its_temporaries(tmp_path):
    """torch AdamW's single-tensor step (CPU) makes two partition-sized temporaries beside
    DeepSpeed's flat fp32 gradient; its foreach path one; a fused Adam none."""
    buffers = {}
    for optimizer in ("fused", "torch-foreach", "torch-single"):
        settings = tiny_settings(tmp_path, optimizer=optimizer)
        buffers[optimizer] = memory_breakdown(load_model(settings), settings, "ngdiff",
                                              world_size=3).gpu["step_buffer"]
    assert buffers == {"fused": 2308, "torch-foreach": 2 * 2308, "torch-single": 3 * 2308}


def test_offload_moves_the_optimizer_side_and_the_copy_to_the_host(tmp_path):
    settings = tiny_settings(tmp_path, offload=True)
    memory = memory_breakdown(load_model(settings), settings, "ngdiff", world_size=3)
    assert memory.gpu["weights"] == 1154
    assert all(memory.gpu[k] == 0 for k in ("master", "moments", "gradients", "ngdiff_extra",
                                            "step_buffer"))
    # DeepSpeed keeps a second fp32 gradient for its CPU optimizer beside the flat buffer.
    assert memory.cpu == {"master": 2308, "moments": 4616, "gradients": 2308,
                          "ngdiff_extra": 2308, "offload_gradient_copy": 2308}


# ----- (d) LoRA ----------------------------------------------------------------------------

def test_lora_parameter_counts():
    llama2 = PRESETS["llama2-7b"]
    # peft's README: Llama-2-7b with r=8 on q_proj and v_proj has 4,194,304 trainable params.
    assert count_parameters(lora_tensors(llama2, 8, ("q_proj", "v_proj"))) == 4_194_304
    # r * (in + out) per projection: 32 layers * 4 * 8 * (4096 + 4096)
    assert count_parameters(lora_tensors(llama2, 8, ("q_proj", "k_proj", "v_proj", "o_proj"))) \
        == 8_388_608
    # GQA: k and v project 4096 -> 1024. 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    assert count_parameters(lora_tensors(PRESETS["llama3-8b"], 16,
                                         ("q_proj", "k_proj", "v_proj", "o_proj"))) == 13_631_488


def test_lora_trains_adapters_only():
    settings = PlanSettings(preset="llama2-7b", lora=True)  # r = 8 on q, k, v, o
    model = load_model(settings)
    _, tensors = model
    assert count_parameters(tensors, trainable_only=True) == 8_388_608
    assert count_parameters(tensors) == 6_738_415_616 + 8_388_608
    memory = memory_breakdown(model, settings, "ngdiff", world_size=1)
    assert memory.gpu["weights"] == 2 * (6_738_415_616 + 8_388_608)  # frozen base still there
    for part, size in (("master", 4), ("gradients", 4), ("ngdiff_extra", 4), ("moments", 8)):
        assert memory.gpu[part] == size * 8_388_608, part
    # Every adapter matrix (8 x 4096) is under the persistence threshold: never re-gathered
    # per pass, and only the adapters' gradients are reduce-scattered.
    volume = communication_bytes(model, settings, "ngdiff", world_size=2)
    assert volume["reduce_scatter"] == 2 * 2 * 4_194_304
    # two forwards, each sending half of every base matrix (65 norms of 4096 are persistent)
    assert volume["all_gather_forward"] == 2 * 2 * (6_738_415_616 - 65 * 4096) // 2


# ----- activations against what autograd keeps ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_saved_activations_match_autograd(dtype, kv_heads):
    """Every tensor HF's Llama saves for backward in a training forward (sdpa, a padding
    mask), counted once per storage, against ``saved_activation_bytes``; the KV cache is not
    a saved tensor, so it is left out here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = ModelDims("probe", vocab_size=512, hidden_size=64, intermediate_size=160,
                     num_layers=3, num_heads=4, num_kv_heads=kv_heads, head_dim=16)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).train()
    rows, seq = 2, 32
    ids = torch.randint(0, 512, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, :3] = 0
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=mask)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    assert sum(saved.values()) == saved_activation_bytes(dims, dtype_bytes, rows, seq,
                                                         kv_cache=False)


def test_modes_differ_where_they_should():
    settings = PlanSettings(preset="llama2-7b", gradient_checkpointing=True)
    model = load_model(settings)
    by_mode = {mode: memory_breakdown(model, settings, mode, world_size=8) for mode in MODES}
    # GDiff and the shared forward carry both tasks' rows in one forward.
    assert by_mode["gdiff"].gpu["activations"] == by_mode["shared_forward"].gpu["activations"] \
        > by_mode["ngdiff"].gpu["activations"] == by_mode["ngdiff_adaptive"].gpu["activations"]
    plain = PlanSettings(preset="llama2-7b")
    assert memory_breakdown(load_model(plain), plain, "ngdiff", 8).gpu["activations"] \
        > by_mode["ngdiff"].gpu["activations"]
    volume = {mode: communication_bytes(model, settings, mode, 8) for mode in MODES}
    gathers = {mode: v["all_gather_forward"] + v["all_gather_backward"]
               for mode, v in volume.items()}
    assert gathers["ngdiff"] == pytest.approx(4 / 3 * gathers["shared_forward"])
    assert gathers["ngdiff"] == pytest.approx(2 * gathers["gdiff"])
    assert volume["ngdiff"]["reduce_scatter"] == 2 * volume["gdiff"]["reduce_scatter"]


def test_probe_constants_are_the_adaptive_rate_defaults():
    from ngdiff_ds.adaptive_lr import AdaptiveLRConfig

    defaults = AdaptiveLRConfig()
    assert defaults.period == PROBE_PERIOD == PlanSettings(preset="llama2-7b").lr_period
    assert len(defaults.multiples) == PROBE_MULTIPLES
    assert defaults.probe_loss == "retain" and PROBE_TASKS == 1


def test_smallest_node_count():
    plan = make_plan(PlanSettings(preset="llama2-70b", nodes=(1, 2, 4, 8),
                                  gradient_checkpointing=True, modes=("ngdiff",)))
    fits = {c["nodes"]: c["fits"] for c in plan["configurations"]}
    smallest = plan["smallest_fitting_nodes"]["ngdiff"]
    assert smallest is not None and smallest > 1
    assert all(fits[n] == (n >= smallest) for n in fits)


# ----- (e) the launcher ----------------------------------------------------------------------

def run_plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "launch/plan.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_json_has_a_fits_boolean_per_configuration():
    result = run_plan("--preset", "llama2-7b", "--gpus-per-node", "8", "--nodes", "1", "2", "4",
                      "--gpu-memory", "80", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert len(plan["configurations"]) == len(MODES) * 3
    assert all(isinstance(c["fits"], bool) for c in plan["configurations"])
    assert set(plan["smallest_fitting_nodes"]) == set(MODES)
    assert plan["model"]["parameters"] == PUBLISHED_PARAMETERS["llama2-7b"]


def test_cli_table_from_a_config_dir(tmp_path):
    result = run_plan("--config", write_config(tmp_path / "m", **EXTRA_CONFIGS["mha-160m"]),
                      "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "24")
    assert result.returncode == 0, result.stderr
    assert "smallest node count that fits" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["--preset", "llama9-1t"], "--preset"),
    (["--preset", "llama2-7b", "--nodes", "0", "2"], "--nodes"),
    (["--preset", "llama2-7b", "--offload-params"], "--offload-params"),
    ([], "--preset"),
])
def test_cli_refuses_bad_input(args, needle):
    result = run_plan(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_cli_refuses_a_dir_without_config_json(tmp_path):
    result = run_plan("--config", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --config {tmp_path}: no config.json there"


def test_plan_imports_neither_torch_nor_deepspeed():
    code = ("import sys, ngdiff_ds.plan; "
            "assert not {'torch', 'deepspeed'} & set(sys.modules), 'imported'")
    subprocess.run([PYTHON, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_kl_reference_model_is_counted(tmp_path):
    """--reference-model: the frozen copy's weight partition (persistent parameters whole),
    its logits on a retain micro-batch, and its gathers; no optimizer side."""
    plain = tiny_settings(tmp_path)
    with_reference = tiny_settings(tmp_path, reference_model=True)
    model = load_model(plain)
    base = memory_breakdown(model, plain, "ngdiff", world_size=3)
    kept = memory_breakdown(model, with_reference, "ngdiff", world_size=3)
    dims, tensors = model
    persistent = sum(t.numel * t.count for t in tensors
                     if t.numel <= plain.zero.stage3_param_persistence_threshold)
    assert base.gpu["reference_weights"] == 0
    assert kept.gpu["reference_weights"] == 1154 + 2 * persistent  # bf16: 2 bytes
    # its bf16 logits and the KL's fp32 log-softmax of them and its exp: 2 + 8 bytes
    logits = plain.micro_batch_size * plain.seq_len * (2 + 8) * dims.vocab_size
    assert kept.gpu["activations"] - base.gpu["activations"] == logits
    assert {k: kept.gpu[k] for k in ("master", "moments", "gradients")} == \
        {k: base.gpu[k] for k in ("master", "moments", "gradients")}
    assert kept.gpu_peak == base.gpu_peak + kept.gpu["reference_weights"] + logits
    from ngdiff_ds.plan.communication import communication_bytes
    assert communication_bytes(model, plain, "ngdiff", 3)["all_gather_reference"] == 0
    assert communication_bytes(model, with_reference, "ngdiff", 3)["all_gather_reference"] == \
        communication_bytes(model, plain, "ngdiff", 3)["all_gather_forward"] / 2
