"""Worker for tests/test_devices.py: runs under ``torchrun --nproc-per-node 2`` (gloo, CPU) on a tensor-parallel
tiny model and writes rank 0's results (and every rank's tokens) to the file given as argv[2]."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import ByteTokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kvagents import KVEmbedding, KVModel, KVPooling, SamplingParams  # noqa: E402


def run(llm: KVModel) -> dict:
    poolings = {"mean": KVPooling(segment="all"), "flat": KVPooling(heads="flatten", segment="generated", layers=2)}
    comps = [KVEmbedding(p, name=k) for k, p in poolings.items()]
    greedy = llm.generate(["hello there", "a longer prompt, to pad"], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True),
                          components=comps)
    sampled = llm.generate(["hello"], SamplingParams(max_new_tokens=8, temperature=1.0, n=2, ignore_eos=True))
    return {
        "tokens": [s.token_ids for group in greedy.samples for s in group],
        "emb": {k: [s.outputs[k].tolist() for group in greedy.samples for s in group] for k in poolings},
        "embed": llm.embed(["hello there", "x"], KVPooling(heads="flatten")).tolist(),
        "sampled": [s.token_ids for s in sampled.samples[0]],
    }


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32,
                                                 attn_implementation="eager")
    assert model.tp_size == 2
    model.generation_config.eos_token_id = 2
    res = run(KVModel(model, ByteTokenizer()))
    gathered = [None, None]
    dist.all_gather_object(gathered, res["sampled"])
    if dist.get_rank() == 0:
        res["sampled_per_rank"] = gathered
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
