"""Context parallelism on the CPU: Gated DeltaNet over the ranks of a gloo group.

    torchrun --nproc-per-node 2 examples/cp_demo.py

Every rank makes the same global inputs, keeps its slice of the time axis, runs
``rule(..., cp_group=group)`` forward and backward, and compares its slice of the outputs, the
global final state and the summed gradients with the single-process call.
"""
from pathlib import Path

import torch
import torch.distributed as dist

import recdsl

dist.init_process_group("gloo")
group = dist.new_group()  # a group of its own (DDP, if any, keeps the default one)
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

rule = recdsl.load(Path(__file__).resolve().parent / "gated_delta.rec")
B, T, H, K, V = 2, 200, 2, 16, 16
g = torch.Generator().manual_seed(0)
x = {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g),
     "v": torch.randn(B, T, H, V, generator=g), "g": -0.05 * torch.rand(B, T, H, generator=g),
     "beta": torch.rand(B, T, H, generator=g)}
s0 = torch.randn(B, H, K, V, generator=g)
mine = slice(rank * T // world, (rank + 1) * T // world)  # this rank's tokens

# the single-process call, for comparison
full = {n: t.clone().requires_grad_() for n, t in x.items()}
out, final = rule(**full, initial_state=s0, output_final_state=True)
(out.sum() + final.sum()).backward()

# context parallel: the slice of every token input; the global initial state on every rank
part = {n: t.clone().requires_grad_() for n, t in x.items()}
cp_out, cp_final = rule(**{n: t[:, mine] for n, t in part.items()}, initial_state=s0,
                        output_final_state=True, cp_group=group)
(cp_out.sum() + cp_final.sum() / world).backward()  # every rank holds the global final state
grad_q = part["q"].grad.clone()
dist.all_reduce(grad_q, group=group)

print(f"rank {rank}/{world}: tokens {mine.start}..{mine.stop - 1}, "
      f"outputs differ by {(cp_out - out[:, mine]).abs().max():.1e}, "
      f"final state by {(cp_final - final).abs().max():.1e}, "
      f"dq by {(grad_q - full['q'].grad).abs().max():.1e}", flush=True)
dist.barrier()  # rank 0 hosts the group's store: nobody leaves while others still use it
dist.destroy_process_group()
