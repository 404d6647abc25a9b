"""Hugging Face models offline: build from a config or a directory, initialise a student from a
teacher's blocks, export a directory transformers loads, and int8 in the compressed-tensors
format, loaded back with the same logits as the in-memory quantized model."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_lm import causal_lm, corpus, gpt2_config, llama_config, no_network, train_tokenizer

from specs.errors import InputError
from specs.lm import HFModel
from trainers.hf_models import (
    HFModelError,
    build_config,
    build_hf_model,
    decoder_blocks,
    init_from_teacher_,
    load_hf_dir,
    model_dir_digest,
    quantize_int8_,
    save_hf_dir,
    save_int8_dir,
)

__all__ = ["no_network"]  # the fixture, used by name
pytestmark = pytest.mark.usefixtures("no_network")
VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, corpus())
    return out


def _ids(seed=0, n=2, length=12):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------- build and load


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_directory_loads_with_the_same_logits(tmp_path, tokenizer_dir, family):
    config = gpt2_config(VOCAB) if family == "gpt2" else llama_config(VOCAB)
    model = causal_lm(config)
    out = save_hf_dir(model, tmp_path / "m", tokenizer=tokenizer_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    again = build_hf_model(HFModel(kind="hf", path=str(out)))
    # the same float32 weights through the same code: bit for bit
    assert torch.equal(_logits(again, _ids()), _logits(model, _ids()))
    # and plain transformers loads it too
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert torch.equal(_logits(plain, _ids()), _logits(model, _ids()))
    assert len(AutoTokenizer.from_pretrained(str(out), local_files_only=True)) == VOCAB


def test_inline_config_and_config_directory_build_the_same_model(tmp_path):
    inline = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    a = build_config(inline)
    a.save_pretrained(str(tmp_path / "cfg"))
    b = build_config(str(tmp_path / "cfg"))
    assert type(a).__name__ == "LlamaConfig" and a.to_diff_dict() == {
        k: v for k, v in b.to_diff_dict().items() if k != "_name_or_path"}
    torch.manual_seed(0)
    m = build_hf_model(HFModel(kind="hf", config=inline))
    assert _logits(m, _ids()).shape == (2, 12, VOCAB)


def test_sequence_classification_task(tmp_path):
    spec = HFModel(kind="hf", task="sequence_classification", config={
        "model_type": "gpt2", "vocab_size": VOCAB, "n_layer": 2, "n_embd": 32, "n_head": 2,
        "num_labels": 3, "pad_token_id": 1})
    model = build_hf_model(spec)
    assert _logits(model, _ids()).shape == (2, 3)


@pytest.mark.parametrize("config,words", [
    ({"model_type": "gpt3"}, ["`model_type`", "gpt3"]),
    ({"model_type": "llama", "hiden_size": 8}, ["hiden_size", "misspelled"]),
])
def test_bad_inline_config_is_an_input_error(config, words):
    with pytest.raises(HFModelError) as info:
        build_config(config)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_pickle_only_directory_is_refused_before_anything_is_loaded(tmp_path):
    model = causal_lm(gpt2_config(VOCAB, n_layer=1))
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(HFModelError, match="pytorch_model.bin.*safetensors only") as info:
        build_hf_model(HFModel(kind="hf", path=str(tmp_path)))
    assert isinstance(info.value, InputError)  # exit status 2
    with pytest.raises(HFModelError, match="does not exist"):
        build_hf_model(HFModel(kind="hf", path=str(tmp_path / "nowhere")))
    (tmp_path / "config.json").unlink()
    with pytest.raises(HFModelError, match="no config.json"):
        build_hf_model(HFModel(kind="hf", path=str(tmp_path)))


def test_digest_follows_the_weights(tmp_path):
    a = save_hf_dir(causal_lm(gpt2_config(VOCAB, n_layer=1), seed=0), tmp_path / "a")
    b = save_hf_dir(causal_lm(gpt2_config(VOCAB, n_layer=1), seed=1), tmp_path / "b")
    c = save_hf_dir(causal_lm(gpt2_config(VOCAB, n_layer=1), seed=0), tmp_path / "c")
    assert model_dir_digest(a) == model_dir_digest(c) != model_dir_digest(b)


# -------------------------------------------------------------------- student from teacher


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_student_blocks_are_the_chosen_teacher_blocks(family):
    make = gpt2_config if family == "gpt2" else llama_config
    teacher = causal_lm(make(VOCAB), seed=0)
    student_spec = HFModel(kind="hf", config={
        **make(VOCAB).to_diff_dict(), "model_type": family,
        ("n_layer" if family == "gpt2" else "num_hidden_layers"): 2},
        init={"from_teacher": True, "layers": [1, 3]})
    student = build_hf_model(student_spec, teacher)
    _, t_blocks = decoder_blocks(teacher)
    _, s_blocks = decoder_blocks(student)
    assert len(s_blocks) == 2
    for s_index, t_index in enumerate([1, 3]):
        t_state, s_state = t_blocks[t_index].state_dict(), s_blocks[s_index].state_dict()
        assert t_state.keys() == s_state.keys()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
    t_rest = {k: v for k, v in teacher.state_dict().items() if ".h." not in k and ".layers." not in k}
    s_state = student.state_dict()
    assert len(t_rest) >= 3  # embeddings, final norm, LM head
    assert all(torch.equal(s_state[k], v) for k, v in t_rest.items())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_student_of_all_teacher_blocks_is_the_teacher(family):
    make = gpt2_config if family == "gpt2" else llama_config
    teacher = causal_lm(make(VOCAB), seed=0)
    student = causal_lm(make(VOCAB), seed=1)
    report = init_from_teacher_(student, teacher, [0, 1, 2, 3])
    assert not report["kept"]
    assert torch.equal(_logits(student, _ids()), _logits(teacher, _ids()))  # same weights, same code


def test_classification_student_keeps_its_fresh_head():
    teacher = causal_lm(gpt2_config(VOCAB), seed=0)
    spec = HFModel(kind="hf", task="sequence_classification", config={
        **gpt2_config(VOCAB, n_layer=2).to_diff_dict(), "model_type": "gpt2", "num_labels": 3,
        "pad_token_id": 1}, init={"from_teacher": True, "layers": [0, 3]})
    student = build_hf_model(spec, teacher)
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)


def test_bad_initialisations_are_clear_errors():
    teacher = causal_lm(llama_config(VOCAB), seed=0)
    student = causal_lm(llama_config(VOCAB, layers=2), seed=1)
    with pytest.raises(HFModelError, match=r"\[4\] out of range: the teacher has 4 blocks"):
        init_from_teacher_(student, teacher, [0, 4])
    with pytest.raises(HFModelError, match="lists 3 teacher blocks but the student has 2"):
        init_from_teacher_(student, teacher, [0, 1, 2])
    narrow = causal_lm(llama_config(VOCAB, layers=2, hidden=32), seed=1)
    with pytest.raises(HFModelError, match="hidden size mismatch: student 32, teacher 64"):
        init_from_teacher_(narrow, teacher, [0, 1])
    other_mlp = causal_lm(llama_config(VOCAB, layers=2, intermediate=96), seed=1)
    with pytest.raises(HFModelError, match="shape mismatch: student model.layers.0.mlp"):
        init_from_teacher_(other_mlp, teacher, [0, 1])
    with pytest.raises(HFModelError, match="one family"):
        init_from_teacher_(causal_lm(gpt2_config(VOCAB, n_layer=2)), teacher, [0, 1])


# ------------------------------------------------------------------------------------ int8


def test_int8_export_in_compressed_tensors_format_reloads_with_the_same_logits(tmp_path,
                                                                               tokenizer_dir):
    model = causal_lm(llama_config(VOCAB), seed=0)
    ids = _ids(3)
    dense = _logits(model, ids)
    quantize_int8_(model)
    quantized = _logits(model, ids)
    diff = (quantized - dense).abs().max().item()
    assert 0 < diff < 0.05 * dense.abs().max().item()  # int8 changed the weights, a little

    out = save_int8_dir(model, tmp_path / "int8", tokenizer=tokenizer_dir)
    assert torch.equal(_logits(model, ids), quantized)  # saving left the model as it was
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (8, "channel", True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert {f"{q}.weight_packed", f"{q}.weight_scale", f"{q}.weight_shape"} <= names
        assert f"{q}.weight" not in names and "lm_head.weight" in names  # the head stays float
        assert f.get_tensor(f"{q}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{q}.weight_scale").shape == (64, 1)  # one scale per output row

    again = load_hf_dir(out)
    # both compute with the same int8 values times the same float32 scales (the in-memory model
    # quantize-dequantizes on the fly, the loaded one was decompressed by compressed-tensors),
    # so only float32 rounding could separate them: 1e-6 absolute on logits of magnitude ~1
    assert torch.allclose(_logits(again, ids), quantized, rtol=0, atol=1e-6)
    w = again.model.layers[0].self_attn.q_proj.weight
    scale = model.model.layers[0].self_attn.q_proj.weight_scale
    codes = torch.round(w / scale)  # int8 codes: compressed-tensors' symmetric range is
    # [-128, 127] with scale = max|w| / 127.5
    assert codes.min() >= -128 and codes.max() <= 127
    assert torch.allclose(codes * scale, w, rtol=0, atol=1e-7)


def test_int8_export_refuses_conv1d_models(tmp_path):
    with pytest.raises(HFModelError, match="Conv1D"):
        quantize_int8_(causal_lm(gpt2_config(VOCAB, n_layer=1)))


def test_the_network_guard_trips():
    """The guard these tests run under fails any internet connection (so a green test above
    means nothing tried the network)."""
    import socket

    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("192.0.2.1", 443))
