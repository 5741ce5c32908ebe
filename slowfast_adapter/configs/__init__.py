"""Model configs shipped with the package (`config.json` transcriptions of public Hub models), usable offline."""

from pathlib import Path

CONFIGS_DIR = Path(__file__).parent
SHIPPED_CONFIGS = {
    "llava-video-7b-qwen2": "llava-hf/LLaVA-Video-7B-Qwen2-hf",
    "qwen2-vl-7b-instruct": "Qwen/Qwen2-VL-7B-Instruct",
}
"""Folder name -> the Hub id it transcribes."""
