"""Server settings: one pydantic-settings class, read from WINDOWLM_* variables and overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WINDOWLM_", extra="forbid")

    weights: Path = Field(BUNDLED_WEIGHTS, description="checkpoint folder (config.json + model.safetensors)")
    model_name: str | None = Field(None, description="model id in the API (default: the checkpoint folder's name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(32, ge=1, description="KV cache slots: sequences decoded together")
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot before new ones get 429")
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    prefill_chunk: int | None = Field(None, ge=1, description="prompt tokens per prefill step (window multiple)")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on /v1 and token routes")
    drain_timeout: float = Field(30.0, ge=0, description="seconds streams in flight may run after SIGTERM")
    ping_interval: float = Field(15.0, gt=0, description="seconds between SSE comment pings on an idle stream")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def served_model_name(self) -> str:
        return self.model_name or self.weights.resolve().name
