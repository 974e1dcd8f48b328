"""hf: baselines through load_hf_baseline: recorded like our checkpoints, weight changes visible, BOS policy applied.

A tiny Llama and a byte-level BPE tokenizer are built offline into tmp_path (no hub, no network)."""
import pytest
import torch
from lm_eval.api.instance import Instance

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's HFLM imports it

from evals.harness.baseline import load_hf_baseline  # noqa: E402

TEXTS = ["the sky is blue", "the grass is green", "a tiny model for tests"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def save_tiny_llama(folder, seed: int) -> None:
    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    save_tiny_llama(folder, seed=0)
    return folder


def load(folder, **kw):
    return load_hf_baseline(str(folder), device="cpu", dtype="float32", batch_size=2, model_args=kw)


def test_recorded_like_ours(tiny):
    lm = load(tiny)
    info = lm.describe()
    assert info["format"] == "hf" and info["dtype"] == "float32" and info["device"] == "cpu"
    assert len(info["sha256"]) == 64 and len(info["tokenizer_sha256"]) == 64
    assert info["tokenizer"] == str(tiny) and info["transformers_version"] == transformers.__version__
    assert info["num_parameters"] == sum(p.numel() for p in lm.model.parameters()) > 0
    assert [p.name for p in lm.weight_files] == ["model.safetensors"]
    from evals.harness import identity  # the run identity, built before loading, must agree with the record

    files = identity.checkpoint_files(f"hf:{tiny}")
    assert identity.files_sha256(files.weights) == info["sha256"] and files.tokenizer == info["tokenizer_sha256"]
    model_info = lm.get_model_info()
    assert set(model_info) == {"model_num_parameters", "model_dtype", "model_revision", "model_sha"}
    assert model_info["model_sha"] == info["sha256"] and model_info["model_dtype"] == "torch.float32"


def test_resaved_weights_change_the_recorded_hash(tmp_path):
    """The runner refuses a stale resume from this: same path, same tokenizer, different weights."""
    folder = tmp_path / "model"
    save_tiny_llama(folder, seed=0)
    first = load(folder).describe()
    save_tiny_llama(folder, seed=1)
    second = load(folder).describe()
    assert first["sha256"] != second["sha256"]
    assert first["tokenizer_sha256"] == second["tokenizer_sha256"]  # the change is the weights', nothing else
    save_tiny_llama(folder, seed=1)  # the same weights saved again hash the same: contents, not file times
    assert load(folder).describe()["sha256"] == second["sha256"]


def test_bos_policy_applied_and_recorded(tiny):
    lm = load(tiny)
    bos, eos = lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id
    lm.set_bos("bos")
    assert lm.tok_encode("the sky")[0] == bos and lm.describe()["bos"] is True and lm.prefix_token_id == bos
    ids, mask = lm.tok_batch_encode(["the sky", "the grass is green"])
    assert ids[0, int((mask[0] == 0).sum())] == bos and ids[1, 0] == bos  # left-padded rows start with BOS
    lm.set_bos("none")
    assert bos not in lm.tok_encode("the sky") and lm.describe()["bos"] is False and lm.prefix_token_id == eos
    with pytest.raises(ValueError, match="bos="):
        lm.set_bos("maybe")


def test_bos_policy_changes_the_scores_as_it_says(tiny):
    """Under each policy a context scores as a plain HF forward over exactly the ids the policy implies."""
    lm = load(tiny)
    req = [Instance("loglikelihood", {}, ("the sky is", " blue"), 0)]
    bos = lm.tokenizer.bos_token_id
    for policy, prefix in (("bos", [bos]), ("none", [])):
        lm.set_bos(policy)
        (ll, _), = lm.loglikelihood(req)
        ctx = prefix + lm.tokenizer.encode("the sky is", add_special_tokens=False)
        whole = prefix + lm.tokenizer.encode("the sky is blue", add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([whole])).logits[0].double(), -1)
        ref = sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
        assert abs(ll - ref) < 1e-4


def test_rolling_scores_the_document_after_one_prefix_token(tiny):
    lm = load(tiny)
    lm.set_bos("bos")
    doc = "the grass is green"
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer.encode(doc, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), -1)
    assert abs(ll - sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids)))) < 1e-4


def test_sharded_weights_are_all_hashed(tmp_path):
    from evals.harness import identity

    folder = tmp_path / "sharded"
    save_tiny_llama(folder, seed=0)
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    lm = load(folder)
    assert len(lm.weight_files) > 1 and all(p.name.endswith(".safetensors") for p in lm.weight_files)
    assert lm.describe()["sha256"] == identity.files_sha256(identity.checkpoint_files(f"hf:{folder}").weights)
