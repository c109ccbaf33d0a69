"""Build the sample stereo calls in calls/ from the demo recordings (data/demo/audio).

Each call has the agent on the left channel and the customer on the right, different speakers,
with the customer starting before the agent has finished (cross-talk). Run from anywhere:

    .venv/bin/python jobs/call-center/make_sample_calls.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
DEMO = HERE.parents[1] / "data" / "demo" / "audio"
RATE = 16_000

# id: (agent clip, customer clip, seconds the customer starts before the agent stops, campaign)
CALLS = {
    "call-0001": ("jfk_inaugural_11s", "librispeech_2412-153948-0000", 1.5, "retention"),
    "call-0002": ("fleurs_en_000", "librispeech_61-70968-0000", 1.0, "support"),
}


def build(agent: np.ndarray, customer: np.ndarray, overlap_s: float) -> np.ndarray:
    start = len(agent) - int(overlap_s * RATE)
    stereo = np.zeros((start + len(customer) + RATE // 2, 2), np.float32)
    stereo[: len(agent), 0] = agent
    stereo[start : start + len(customer), 1] = customer
    return stereo


def main() -> None:
    (HERE / "calls").mkdir(exist_ok=True)
    rows = []
    for call_id, (agent, customer, overlap_s, campaign) in CALLS.items():
        a, rate_a = sf.read(DEMO / f"{agent}.flac", dtype="float32")
        c, rate_c = sf.read(DEMO / f"{customer}.flac", dtype="float32")
        assert rate_a == rate_c == RATE and a.ndim == c.ndim == 1
        sf.write(HERE / "calls" / f"{call_id}.flac", build(a, c, overlap_s), RATE, subtype="PCM_16")
        rows.append({"id": call_id, "audio": f"calls/{call_id}.flac", "campaign": campaign, "language": "en",
                     "agent_clip": agent, "customer_clip": customer})
    (HERE / "calls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
