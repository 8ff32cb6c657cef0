"""The rollout worker: holds one copy of the generator and samples whole prompt groups.

``generate`` returns three objects (Ray ``num_returns=3``) so each goes only where it is needed:
the :class:`Rollout` (latents, trajectory, log-probs) to the learner, the decoded
:class:`GroupMedia` to the reward pools, and a small :class:`RolloutInfo` to the controller.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import ray
import torch

from raygrpo.algorithms import RolloutSpec, rollout_spec
from raygrpo.config import Config
from raygrpo.contracts import Conditioning, ConditioningBatch, GroupMedia, PromptGroup, Rollout, RolloutInfo, SyncReport, WeightsMessage
from raygrpo.guard.sampling import HeldOutRequest, HeldOutSamples, sample_held_out
from raygrpo.models import load_model
from raygrpo.models.lora import add_lora
from raygrpo.runtime import role_device, set_torch_threads, torch_dtype
from raygrpo.sampling import grid_steps, make_ode_solver, predicted_x0
from raygrpo.weight_broadcast import WeightBroadcastGroup
from raygrpo.weights import load_weights


class StaleWorkerError(RuntimeError):
    """A group asked for another policy version than the worker holds: it was restarted (at version 0) after the
    controller last sent it weights. The scheduler sends it the current version and the group again."""


class RolloutWorker:
    def __init__(self, config: Config):
        set_torch_threads(config.rollout.num_cpus)
        self.config = config
        self.device = role_device(config.rollout.num_gpus, config.run.device_override)
        self.spec: RolloutSpec = rollout_spec(config)
        self.model = load_model(
            config.model.family,
            config.model.pretrained,
            torch_dtype=torch_dtype(config.model.dtype),
            device=self.device,
            height=config.model.height,
            width=config.model.width,
            guidance_scale=config.model.guidance_scale,
            max_sequence_length=config.model.max_sequence_length,
            num_frames=config.model.num_frames,
            train_expert=config.model.train_expert,  # Wan 2.2 A14B: the expert this side trains / receives
        )
        # One dtype for every tensor of the network, as the learner computes it (FSDP2 all-gathers every
        # parameter as model.dtype). diffusers keeps some modules in float32 (Wan: time embedder, norms,
        # scale-shift tables); left so, rollout would sample with other numerics than the learner
        # recomputes (the first ratio would leave 1) and hold tensors the sync does not send in that dtype.
        # Those modules still compute in float32 where diffusers upcasts (FP32LayerNorm, temb.float()).
        # nn.Module.to, not diffusers' override of it, which warns about exactly this cast on every start.
        torch.nn.Module.to(self.model.transformer, torch_dtype(config.model.dtype))
        self.model.transformer.eval()
        if config.model.lora is not None:
            add_lora(self.model.transformer, config.model.lora)  # the learner sends the adapter's tensors only
        self.policy_version = 0
        self.incarnation = uuid.uuid4().hex

    def set_weights(self, message: WeightsMessage) -> SyncReport:
        """Load a version in place; reports the version and the digest of what the network now holds (load_weights
        has checked it against the learner's) for the controller to compare across workers."""
        start = time.perf_counter()
        crc = load_weights(self.model.transformer, message)
        self.policy_version = message.policy_version
        return SyncReport(self.policy_version, crc, time.perf_counter() - start)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0) -> int:
        """Join the learner-to-rollout broadcast group (``rollout.weight_sync: collective``) as ``rank``, leaving an older one."""
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = WeightBroadcastGroup(host, port, rank, world_size, self.device, timeout_s=timeout_s)
        return rank

    def receive_weights(self, policy_version: int, names: list[str]) -> SyncReport:
        """Receive version ``policy_version`` from the broadcast group into the network, in place; reports the
        version and the digest of the received tensors for the controller to compare with the learner's."""
        start = time.perf_counter()
        crc = self.weight_group.receive_into(self.model.transformer, names, self.config.rollout.weight_verify, policy_version)
        self.policy_version = policy_version
        return SyncReport(self.policy_version, crc, time.perf_counter() - start)

    def sample_held_out(self, request: HeldOutRequest) -> HeldOutSamples:
        """The reward-hacking guard's held-out samples with the weights this worker holds (raygrpo/guard/sampling.py)."""
        return sample_held_out(self.model, request, self.policy_version)

    def status(self) -> tuple[int, str]:
        """``(policy version it samples with, incarnation)``: the version is 0 after a restart until weights are
        pushed again; the incarnation is new for every start of the actor, so the controller can tell a restart."""
        return self.policy_version, self.incarnation

    @torch.no_grad()
    def generate(self, group: PromptGroup) -> tuple[Rollout, GroupMedia, RolloutInfo]:
        """Sample the G members of one group with the algorithm's sampler, recording what it asks for."""
        if group.policy_version != self.policy_version:
            raise StaleWorkerError(
                f"group {group.group_id} asks for policy version {group.policy_version}, this rollout worker has {self.policy_version}"
            )
        start = time.perf_counter()
        cond = self.model.encode_prompt(group.prompt, group.image)  # text-only prompts are cached per text
        # The grid first: a VP model (family sd) scales its initial noise to the grid's first noise level.
        sigmas = self.model.sigma_grid(self.spec.sampler, self.config.rollout.num_steps, self.config.rollout.shift).to(self.device)  # [T+1]
        generator = torch.Generator().manual_seed(group.seed)
        g, offset = group.group_size, group.member_offset
        if self.spec.shared_noise:
            first = self.model.initial_noise(generator, 1)  # [1, ...]
            noise = first.expand(g, *first.shape[1:]).clone()  # [G, ...]
        else:
            # Members offset..offset+G-1 of the group's noise: the same whichever worker samples them.
            noise = self.model.initial_noise(generator, offset + g)[offset:]  # [G, ...]
        if offset:
            # A part of a spread group draws its SDE noise from its own stream (parts run in parallel).
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([group.seed, offset]).generate_state(1)[0]))
        window = None
        if self.spec.record_trajectory and self.spec.sde_window is not None:
            window = self.spec.sde_window.bounds(group, len(sigmas) - 1)
            if self.spec.post_window is not None:
                sigmas = self.spec.post_window.sigmas(sigmas, window)  # MixGRPO-Flash: this group's grid
        if self.spec.record_trajectory:
            final, trajectory, log_probs = self._sample_sde(noise, sigmas, cond, generator, window)
        else:
            final, trajectory, log_probs = self._sample_ode(noise, sigmas, cond)
        images = self.model.decode(final.to(self.device))  # [G, H, W, 3] uint8
        rollout = Rollout(
            group=group,
            policy_version=self.policy_version,
            conditioning=cond,
            sigmas=sigmas.cpu().numpy(),
            final_latents=final.numpy(),
            trajectory=None if trajectory is None else trajectory.numpy(),
            log_probs=None if log_probs is None else log_probs.numpy(),
            window=window,
        )
        seconds = time.perf_counter() - start
        # One group per call, one call at a time: the worker was busy with this group for the whole call.
        info = RolloutInfo(group.group_id, self.policy_version, seconds, rollout.nbytes, busy_seconds=seconds)
        return rollout, GroupMedia(group=group, images=np.ascontiguousarray(images)), info

    def _micro_batches(self, noise: torch.Tensor, cond: Conditioning):
        """(slice, latents, conditioning) per micro-batch of the group."""
        micro = self.config.rollout.micro_batch_size
        full = ConditioningBatch.of(cond, micro, self.device)  # one transfer per group; smaller last batches slice it
        for lo in range(0, len(noise), micro):
            batch = slice(lo, min(lo + micro, len(noise)))
            b = batch.stop - lo
            yield batch, noise[batch].to(self.device, torch.float32), full if b == micro else ConditioningBatch.of(cond, b, self.device)

    def _sample_sde(self, noise, sigmas, cond, generator, window: tuple[int, int] | None):
        """SDE sampling that records x and each step's log-prob (GRPO-style algorithms): over every step, or over the
        SDE steps ``[start, stop)`` of ``window`` only, with deterministic Euler steps before and after it (after it:
        ``spec.post_window``'s solver when set, MixGRPO-Flash)."""
        g, num_steps = len(noise), len(sigmas) - 1
        start, stop = window if window is not None else (0, num_steps)
        trajectory = torch.empty((g, stop - start + 1, *noise.shape[1:]), dtype=torch.float32)  # [G, W+1, ...]
        log_probs = torch.empty((g, stop - start), dtype=torch.float32)  # [G, W]
        final = torch.empty(noise.shape, dtype=torch.float32)  # [G, ...]
        steps = grid_steps(self.spec.sampler, self.spec.noise_level, sigmas)  # the learner recomputes these very steps
        euler = grid_steps("ode", 0.0, sigmas)
        post = self.spec.post_window
        for batch, x, c in self._micro_batches(noise, cond):
            after = None if post is None else make_ode_solver(post.solver, sigmas)  # fed every step: a multistep history
            for i in range(num_steps):
                if i == start:
                    trajectory[batch, 0] = x.cpu()
                v = self.model.velocity(x, sigmas[i].expand(len(x)), c)
                x_after = None if after is None else after.step(x, v, i)
                if i == num_steps - 1:
                    # DanceGRPO decodes the last step's clean prediction, not the noisy final state.
                    final[batch] = predicted_x0(x, v, sigmas[i]).cpu()
                if not start <= i < stop:
                    x = x_after if x_after is not None and i >= stop else euler.transition(x, v, i).mean
                    continue
                step = steps.transition(x, v, i)
                x_next = step.sample(generator)
                log_probs[batch, i - start] = step.log_prob(x_next).cpu()
                trajectory[batch, i - start + 1] = x_next.cpu()
                x = x_next
        return final, trajectory, log_probs

    def _sample_ode(self, noise, sigmas, cond):
        """Deterministic ODE sampling that keeps only the final latents (DGPO)."""
        final = torch.empty(noise.shape, dtype=torch.float32)  # [G, ...]
        for batch, x, c in self._micro_batches(noise, cond):
            solver = make_ode_solver(self.spec.sampler, sigmas)
            for i in range(len(sigmas) - 1):
                x = solver.step(x, self.model.velocity(x, sigmas[i].expand(len(x)), c), i)
            final[batch] = x.cpu()
        return final, None, None
