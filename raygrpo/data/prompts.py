"""Prompt sources and the order prompts are visited in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raygrpo.config import DataConfig


class PromptFileError(ValueError):
    pass


def load_prompts(data: DataConfig) -> list[str]:
    """Inline prompts, a .txt file (one per line, blank lines skipped) or a .parquet file's ``prompt`` column."""
    if data.prompts is not None:
        return list(data.prompts)
    path = Path(data.prompt_file)
    if not path.is_file():
        raise PromptFileError(f"data.prompt_file: {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "prompt" not in table.column_names:
            raise PromptFileError(f"data.prompt_file: {str(path)!r} has no 'prompt' column (columns: {table.column_names})")
        prompts = [str(p) for p in table.column("prompt").to_pylist() if p]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"data.prompt_file: {str(path)!r} holds no prompts")
    return prompts


class PromptOrder:
    """Visits the prompts in a fresh seeded permutation each epoch (each prompt once per epoch)."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts = num_prompts
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def take(self, n: int) -> list[int]:
        ids = []
        while len(ids) < n:
            if not self.order:
                self.order = self.rng.permutation(self.num_prompts).tolist()
            ids.append(self.order.pop(0))
        return ids
