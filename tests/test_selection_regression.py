"""Selection results pinned case by case: seeded random variant sets × the hand-built profiles of
tests/test_selection_index.py × random policies, 250 cases.

Each expectation is the chosen variant's name (or `no fit`) and a digest of everything a
caller sees: the estimate and budget, every candidate's verdict, rank, estimate, budget and
reasons, `explain()`, and for `NoVariantFits` the message, `smallest` and `budget`.

The table was generated when `select` became `VariantIndex(...).select` (one engine). Before
the Python loop that `select` had been was removed, the engine was checked against it on the
200 cases here without `backends` and on 2,400 more: the same chosen variant, the same
reasons and messages everywhere. Estimates differed only by up to 2 bytes (the loop truncated
the sum; now each part is truncated, so the estimate is `estimate_memory(v).total`) and for a
`head_dim` of 0 in the explanation of rejected variants (the loop's explanation and its hot
path disagreed there; now it is derived from n_embd / n_head, as the hot path did). The 50
cases on the two profiles with `backends` set came with that rule and are pinned as given.

Later deliberate changes: `memory.max_bytes` caps the budget itself (it was a cap on the
RAM share before the headroom came off), so the agent's one memory budget means what it
says; the cases with a cap were re-pinned then. A winner below `min_quality` no longer reads
"nothing at or above it fits" when no variant is at or above it, or when one fits on a later
device, nor "... at or above <floor>" of itself; the 9 cases with such a winner were re-pinned
(the same variant chosen in every case).

A deliberate change of behaviour or wording changes this table: check the differences it
reports, then print a new one with `.venv/bin/python tests/test_selection_regression.py`.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from test_selection_index import PROFILES, judge, random_cases

from registry.selection import NoVariantFits, SelectionPolicy
from registry.types import VariantSpec


def outcome(
    variants: list[VariantSpec], profile: str, policy: SelectionPolicy, alias: str | None
) -> str:
    out = judge(variants, PROFILES[profile], policy, alias)
    seen = [c.model_dump(mode="json", exclude={"variant"}) | {"name": c.variant.name}
            for c in out.candidates]
    if isinstance(out, NoVariantFits):
        head, data = "no fit", [str(out), out.smallest, out.budget, seen]
    else:
        head = out.chosen.name
        data = [out.model_alias, out.estimated_memory, out.budget, out.explain(), seen]
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return f"{head}|{digest}"


CASES = random_cases(range(25), sets=1, policies=1)

EXPECTED: dict[str, str] = {
    "0.0.0 cpu-2gib-no-runtimes": "v11|268306ba8be5",
    "0.0.0 cpu-16gib-cpu-runtimes": "v11|268306ba8be5",
    "0.0.0 rtx-npu-cuda": "v26|76e08c165901",
    "0.0.0 rtx-no-gpu-runtime": "v12|3583bfb6de9a",
    "0.0.0 jetson-integrated": "v12|2a446d619d1a",
    "0.0.0 two-gpus-vulkan-rocm": "v12|40d60cce9488",
    "0.0.0 hexagon-online-qnn": "v11|1dfbd1b00e95",
    "0.0.0 hexagon-offline": "v11|35ed1a9016b6",
    "0.0.0 rtx-cuda-gguf-backend-only": "v0|66ef3c2db9c6",
    "0.0.0 cpu-8gib-no-backends": "no fit|309a663d71df",
    "1.0.0 cpu-2gib-no-runtimes": "no fit|78fbc434dfaa",
    "1.0.0 cpu-16gib-cpu-runtimes": "v0|91d2ac34acfa",
    "1.0.0 rtx-npu-cuda": "v0|c1027002d359",
    "1.0.0 rtx-no-gpu-runtime": "v0|4552f9c17ced",
    "1.0.0 jetson-integrated": "v0|d61c77e29d94",
    "1.0.0 two-gpus-vulkan-rocm": "v0|19639b8f632b",
    "1.0.0 hexagon-online-qnn": "v0|91d2ac34acfa",
    "1.0.0 hexagon-offline": "v0|91d2ac34acfa",
    "1.0.0 rtx-cuda-gguf-backend-only": "v0|c1027002d359",
    "1.0.0 cpu-8gib-no-backends": "no fit|5f774ceb19cd",
    "2.0.0 cpu-2gib-no-runtimes": "no fit|a3a5b9dc8cb3",
    "2.0.0 cpu-16gib-cpu-runtimes": "no fit|a3a5b9dc8cb3",
    "2.0.0 rtx-npu-cuda": "no fit|a3a5b9dc8cb3",
    "2.0.0 rtx-no-gpu-runtime": "no fit|a3a5b9dc8cb3",
    "2.0.0 jetson-integrated": "no fit|a3a5b9dc8cb3",
    "2.0.0 two-gpus-vulkan-rocm": "no fit|a3a5b9dc8cb3",
    "2.0.0 hexagon-online-qnn": "no fit|a3a5b9dc8cb3",
    "2.0.0 hexagon-offline": "no fit|a3a5b9dc8cb3",
    "2.0.0 rtx-cuda-gguf-backend-only": "no fit|a3a5b9dc8cb3",
    "2.0.0 cpu-8gib-no-backends": "no fit|a3a5b9dc8cb3",
    "3.0.0 cpu-2gib-no-runtimes": "no fit|7248897c73d6",
    "3.0.0 cpu-16gib-cpu-runtimes": "no fit|01a2b57de4ca",
    "3.0.0 rtx-npu-cuda": "no fit|3799d51f9445",
    "3.0.0 rtx-no-gpu-runtime": "no fit|9185b1a41149",
    "3.0.0 jetson-integrated": "no fit|19ed2dd06b26",
    "3.0.0 two-gpus-vulkan-rocm": "no fit|f773504279ba",
    "3.0.0 hexagon-online-qnn": "no fit|01a2b57de4ca",
    "3.0.0 hexagon-offline": "no fit|01a2b57de4ca",
    "3.0.0 rtx-cuda-gguf-backend-only": "no fit|03e07c6a4f13",
    "3.0.0 cpu-8gib-no-backends": "no fit|ab0d9f92e9e6",
    "4.0.0 cpu-2gib-no-runtimes": "no fit|9cc2de47f08a",
    "4.0.0 cpu-16gib-cpu-runtimes": "no fit|9cc2de47f08a",
    "4.0.0 rtx-npu-cuda": "no fit|a6d5df86faa1",
    "4.0.0 rtx-no-gpu-runtime": "no fit|9cc2de47f08a",
    "4.0.0 jetson-integrated": "no fit|a6d5df86faa1",
    "4.0.0 two-gpus-vulkan-rocm": "no fit|eb2962f39490",
    "4.0.0 hexagon-online-qnn": "no fit|9cc2de47f08a",
    "4.0.0 hexagon-offline": "no fit|9cc2de47f08a",
    "4.0.0 rtx-cuda-gguf-backend-only": "no fit|a6d5df86faa1",
    "4.0.0 cpu-8gib-no-backends": "no fit|13e05360e801",
    "5.0.0 cpu-2gib-no-runtimes": "no fit|21ddd0a4ca29",
    "5.0.0 cpu-16gib-cpu-runtimes": "no fit|21ddd0a4ca29",
    "5.0.0 rtx-npu-cuda": "v101|f22bf32932a6",
    "5.0.0 rtx-no-gpu-runtime": "no fit|c0345e83ae7a",
    "5.0.0 jetson-integrated": "no fit|f9edcbe0791e",
    "5.0.0 two-gpus-vulkan-rocm": "v43|48d3b11c7fd2",
    "5.0.0 hexagon-online-qnn": "no fit|5a8d44bbf754",
    "5.0.0 hexagon-offline": "no fit|5c98b96a3d13",
    "5.0.0 rtx-cuda-gguf-backend-only": "no fit|bb7742165ab1",
    "5.0.0 cpu-8gib-no-backends": "no fit|c3bf092be49b",
    "6.0.0 cpu-2gib-no-runtimes": "v109|6d08f7340990",
    "6.0.0 cpu-16gib-cpu-runtimes": "v109|6d08f7340990",
    "6.0.0 rtx-npu-cuda": "v129|5ae9ece5e7d4",
    "6.0.0 rtx-no-gpu-runtime": "v83|2b8d6697179d",
    "6.0.0 jetson-integrated": "v129|5655132462cc",
    "6.0.0 two-gpus-vulkan-rocm": "v50|4049b32bcb3f",
    "6.0.0 hexagon-online-qnn": "v109|b514fe5cc9ef",
    "6.0.0 hexagon-offline": "v109|b514fe5cc9ef",
    "6.0.0 rtx-cuda-gguf-backend-only": "v91|7bfc5bcce576",
    "6.0.0 cpu-8gib-no-backends": "no fit|c67804876f87",
    "7.0.0 cpu-2gib-no-runtimes": "v16|4bc1b380efe6",
    "7.0.0 cpu-16gib-cpu-runtimes": "v16|4bc1b380efe6",
    "7.0.0 rtx-npu-cuda": "v3|cfee214b5c25",
    "7.0.0 rtx-no-gpu-runtime": "v16|2d57af1ab08d",
    "7.0.0 jetson-integrated": "v1|59adeaf241d3",
    "7.0.0 two-gpus-vulkan-rocm": "v1|f24a21c4e2bc",
    "7.0.0 hexagon-online-qnn": "v16|5e20c660ebb3",
    "7.0.0 hexagon-offline": "v16|234207e91526",
    "7.0.0 rtx-cuda-gguf-backend-only": "v3|170e1d70d7f0",
    "7.0.0 cpu-8gib-no-backends": "no fit|c26412eecdaa",
    "8.0.0 cpu-2gib-no-runtimes": "no fit|d6200b8b5da3",
    "8.0.0 cpu-16gib-cpu-runtimes": "no fit|966d5078ab30",
    "8.0.0 rtx-npu-cuda": "no fit|8f9d1a6034d0",
    "8.0.0 rtx-no-gpu-runtime": "no fit|fecfbc341db2",
    "8.0.0 jetson-integrated": "no fit|966d5078ab30",
    "8.0.0 two-gpus-vulkan-rocm": "no fit|bfed59551b4a",
    "8.0.0 hexagon-online-qnn": "no fit|966d5078ab30",
    "8.0.0 hexagon-offline": "no fit|966d5078ab30",
    "8.0.0 rtx-cuda-gguf-backend-only": "no fit|8f9d1a6034d0",
    "8.0.0 cpu-8gib-no-backends": "no fit|966d5078ab30",
    "9.0.0 cpu-2gib-no-runtimes": "v49|f3ea07888b96",
    "9.0.0 cpu-16gib-cpu-runtimes": "v49|6bd9573ff7d5",
    "9.0.0 rtx-npu-cuda": "v37|dc3290d7a966",
    "9.0.0 rtx-no-gpu-runtime": "v37|91028bb95f87",
    "9.0.0 jetson-integrated": "v37|8eea10f27add",
    "9.0.0 two-gpus-vulkan-rocm": "v37|22356e7bc971",
    "9.0.0 hexagon-online-qnn": "v49|53bfb1a8d03d",
    "9.0.0 hexagon-offline": "v49|53bfb1a8d03d",
    "9.0.0 rtx-cuda-gguf-backend-only": "v29|9c6049ba077e",
    "9.0.0 cpu-8gib-no-backends": "no fit|4774f762bbd4",
    "10.0.0 cpu-2gib-no-runtimes": "v110|3dbbab36a634",
    "10.0.0 cpu-16gib-cpu-runtimes": "v110|612fe386f9e3",
    "10.0.0 rtx-npu-cuda": "v110|045d32121c05",
    "10.0.0 rtx-no-gpu-runtime": "v110|74592122978f",
    "10.0.0 jetson-integrated": "v110|5864a49b02ba",
    "10.0.0 two-gpus-vulkan-rocm": "v110|2aa98e23d5c2",
    "10.0.0 hexagon-online-qnn": "v110|f72dbaadcd03",
    "10.0.0 hexagon-offline": "v110|e7a8d98bc8b2",
    "10.0.0 rtx-cuda-gguf-backend-only": "v110|cb60c54349d8",
    "10.0.0 cpu-8gib-no-backends": "no fit|64642a0afd3b",
    "11.0.0 cpu-2gib-no-runtimes": "v9|28112d3dcda2",
    "11.0.0 cpu-16gib-cpu-runtimes": "v9|28112d3dcda2",
    "11.0.0 rtx-npu-cuda": "v4|3a74c838796b",
    "11.0.0 rtx-no-gpu-runtime": "v10|490ee80c6e28",
    "11.0.0 jetson-integrated": "v4|51665706c283",
    "11.0.0 two-gpus-vulkan-rocm": "v10|800d55801be7",
    "11.0.0 hexagon-online-qnn": "v9|a0e27760d598",
    "11.0.0 hexagon-offline": "v9|639edc2ecea3",
    "11.0.0 rtx-cuda-gguf-backend-only": "v41|04802201248c",
    "11.0.0 cpu-8gib-no-backends": "no fit|4da82684f6cc",
    "12.0.0 cpu-2gib-no-runtimes": "v14|249e0fbaf246",
    "12.0.0 cpu-16gib-cpu-runtimes": "v14|1f2efdd33374",
    "12.0.0 rtx-npu-cuda": "v38|ce347de73cac",
    "12.0.0 rtx-no-gpu-runtime": "v14|8a1c7dd0bb94",
    "12.0.0 jetson-integrated": "v48|de2a60e416a9",
    "12.0.0 two-gpus-vulkan-rocm": "v16|46aad07e4cb7",
    "12.0.0 hexagon-online-qnn": "v40|576ad15d9f05",
    "12.0.0 hexagon-offline": "v40|715cec0e38bf",
    "12.0.0 rtx-cuda-gguf-backend-only": "v1|0972d25055cc",
    "12.0.0 cpu-8gib-no-backends": "no fit|2f7424ad1960",
    "13.0.0 cpu-2gib-no-runtimes": "no fit|ffd5e0063420",
    "13.0.0 cpu-16gib-cpu-runtimes": "no fit|ffd5e0063420",
    "13.0.0 rtx-npu-cuda": "v2|47a46388bca6",
    "13.0.0 rtx-no-gpu-runtime": "no fit|c391bcd84b81",
    "13.0.0 jetson-integrated": "no fit|f84b275fefad",
    "13.0.0 two-gpus-vulkan-rocm": "no fit|b4de84749cdd",
    "13.0.0 hexagon-online-qnn": "no fit|0ef23377b034",
    "13.0.0 hexagon-offline": "no fit|170bad4b76ea",
    "13.0.0 rtx-cuda-gguf-backend-only": "v6|2dd163696fd8",
    "13.0.0 cpu-8gib-no-backends": "no fit|3b78afc9f33a",
    "14.0.0 cpu-2gib-no-runtimes": "no fit|a59277f73f33",
    "14.0.0 cpu-16gib-cpu-runtimes": "no fit|7e17be1f7fd0",
    "14.0.0 rtx-npu-cuda": "no fit|7e17be1f7fd0",
    "14.0.0 rtx-no-gpu-runtime": "no fit|7e17be1f7fd0",
    "14.0.0 jetson-integrated": "no fit|7e17be1f7fd0",
    "14.0.0 two-gpus-vulkan-rocm": "v0|76ec8c29155e",
    "14.0.0 hexagon-online-qnn": "no fit|7e17be1f7fd0",
    "14.0.0 hexagon-offline": "no fit|7e17be1f7fd0",
    "14.0.0 rtx-cuda-gguf-backend-only": "no fit|50c1e7d4f117",
    "14.0.0 cpu-8gib-no-backends": "no fit|f8e079f5d4c0",
    "15.0.0 cpu-2gib-no-runtimes": "no fit|bde87fa8442a",
    "15.0.0 cpu-16gib-cpu-runtimes": "no fit|5355f0659e93",
    "15.0.0 rtx-npu-cuda": "no fit|5355f0659e93",
    "15.0.0 rtx-no-gpu-runtime": "no fit|5355f0659e93",
    "15.0.0 jetson-integrated": "no fit|bde87fa8442a",
    "15.0.0 two-gpus-vulkan-rocm": "no fit|5355f0659e93",
    "15.0.0 hexagon-online-qnn": "no fit|5355f0659e93",
    "15.0.0 hexagon-offline": "no fit|5355f0659e93",
    "15.0.0 rtx-cuda-gguf-backend-only": "no fit|5355f0659e93",
    "15.0.0 cpu-8gib-no-backends": "no fit|bde87fa8442a",
    "16.0.0 cpu-2gib-no-runtimes": "v3|1029295097c3",
    "16.0.0 cpu-16gib-cpu-runtimes": "v7|e912f425457b",
    "16.0.0 rtx-npu-cuda": "v13|b73b39b76068",
    "16.0.0 rtx-no-gpu-runtime": "v13|e9f8ad2f3f4d",
    "16.0.0 jetson-integrated": "v13|48206ae12e4e",
    "16.0.0 two-gpus-vulkan-rocm": "v18|81669b9f799e",
    "16.0.0 hexagon-online-qnn": "v7|257554e35e5a",
    "16.0.0 hexagon-offline": "v18|8b72cfc7f689",
    "16.0.0 rtx-cuda-gguf-backend-only": "v11|f31bc539c889",
    "16.0.0 cpu-8gib-no-backends": "no fit|6701ac180b2f",
    "17.0.0 cpu-2gib-no-runtimes": "v61|1a974b5a055f",
    "17.0.0 cpu-16gib-cpu-runtimes": "v61|1a974b5a055f",
    "17.0.0 rtx-npu-cuda": "v13|3fb2cd7da413",
    "17.0.0 rtx-no-gpu-runtime": "v57|8b882c047990",
    "17.0.0 jetson-integrated": "v57|9c13e43862ea",
    "17.0.0 two-gpus-vulkan-rocm": "v10|98f99af6050b",
    "17.0.0 hexagon-online-qnn": "v61|530e2253e6ad",
    "17.0.0 hexagon-offline": "v61|530e2253e6ad",
    "17.0.0 rtx-cuda-gguf-backend-only": "v0|e872eb11493a",
    "17.0.0 cpu-8gib-no-backends": "no fit|95b2afbf8031",
    "18.0.0 cpu-2gib-no-runtimes": "no fit|193017f363b3",
    "18.0.0 cpu-16gib-cpu-runtimes": "no fit|193017f363b3",
    "18.0.0 rtx-npu-cuda": "no fit|193017f363b3",
    "18.0.0 rtx-no-gpu-runtime": "no fit|193017f363b3",
    "18.0.0 jetson-integrated": "no fit|193017f363b3",
    "18.0.0 two-gpus-vulkan-rocm": "no fit|c9af264f4fa7",
    "18.0.0 hexagon-online-qnn": "no fit|193017f363b3",
    "18.0.0 hexagon-offline": "no fit|193017f363b3",
    "18.0.0 rtx-cuda-gguf-backend-only": "no fit|193017f363b3",
    "18.0.0 cpu-8gib-no-backends": "no fit|c3c4e388d46d",
    "19.0.0 cpu-2gib-no-runtimes": "no fit|f49a644f3581",
    "19.0.0 cpu-16gib-cpu-runtimes": "no fit|f49a644f3581",
    "19.0.0 rtx-npu-cuda": "no fit|f49a644f3581",
    "19.0.0 rtx-no-gpu-runtime": "no fit|f49a644f3581",
    "19.0.0 jetson-integrated": "no fit|f49a644f3581",
    "19.0.0 two-gpus-vulkan-rocm": "no fit|f49a644f3581",
    "19.0.0 hexagon-online-qnn": "no fit|f49a644f3581",
    "19.0.0 hexagon-offline": "no fit|f49a644f3581",
    "19.0.0 rtx-cuda-gguf-backend-only": "no fit|f49a644f3581",
    "19.0.0 cpu-8gib-no-backends": "no fit|f49a644f3581",
    "20.0.0 cpu-2gib-no-runtimes": "no fit|ce06317c43de",
    "20.0.0 cpu-16gib-cpu-runtimes": "no fit|98db372ad8fc",
    "20.0.0 rtx-npu-cuda": "no fit|3f8bb8313196",
    "20.0.0 rtx-no-gpu-runtime": "no fit|9618c33308c8",
    "20.0.0 jetson-integrated": "no fit|c3f08b6549cd",
    "20.0.0 two-gpus-vulkan-rocm": "v0|7bb1344e3100",
    "20.0.0 hexagon-online-qnn": "v0|9aaae7415a37",
    "20.0.0 hexagon-offline": "v0|9aaae7415a37",
    "20.0.0 rtx-cuda-gguf-backend-only": "no fit|9c1827c643e8",
    "20.0.0 cpu-8gib-no-backends": "no fit|9b021783c162",
    "21.0.0 cpu-2gib-no-runtimes": "no fit|40247845071f",
    "21.0.0 cpu-16gib-cpu-runtimes": "no fit|900fd40cc3a5",
    "21.0.0 rtx-npu-cuda": "no fit|6845723675ca",
    "21.0.0 rtx-no-gpu-runtime": "no fit|3b00d204c667",
    "21.0.0 jetson-integrated": "no fit|a4a437c814f7",
    "21.0.0 two-gpus-vulkan-rocm": "no fit|4fb7f84d7e97",
    "21.0.0 hexagon-online-qnn": "no fit|900fd40cc3a5",
    "21.0.0 hexagon-offline": "no fit|900fd40cc3a5",
    "21.0.0 rtx-cuda-gguf-backend-only": "no fit|6845723675ca",
    "21.0.0 cpu-8gib-no-backends": "no fit|26b6d29b08a7",
    "22.0.0 cpu-2gib-no-runtimes": "no fit|7ddf1d2fca62",
    "22.0.0 cpu-16gib-cpu-runtimes": "no fit|7672283be991",
    "22.0.0 rtx-npu-cuda": "v0|51f30c70c87f",
    "22.0.0 rtx-no-gpu-runtime": "no fit|b4bb032e2767",
    "22.0.0 jetson-integrated": "v0|278d6cbd8084",
    "22.0.0 two-gpus-vulkan-rocm": "no fit|96703fd5df5e",
    "22.0.0 hexagon-online-qnn": "no fit|7672283be991",
    "22.0.0 hexagon-offline": "no fit|7672283be991",
    "22.0.0 rtx-cuda-gguf-backend-only": "no fit|39874997ebfb",
    "22.0.0 cpu-8gib-no-backends": "no fit|b1576b775d2d",
    "23.0.0 cpu-2gib-no-runtimes": "v6|3088a64b32f8",
    "23.0.0 cpu-16gib-cpu-runtimes": "v6|3088a64b32f8",
    "23.0.0 rtx-npu-cuda": "v6|3088a64b32f8",
    "23.0.0 rtx-no-gpu-runtime": "v6|3088a64b32f8",
    "23.0.0 jetson-integrated": "v6|3088a64b32f8",
    "23.0.0 two-gpus-vulkan-rocm": "v6|3088a64b32f8",
    "23.0.0 hexagon-online-qnn": "v6|3088a64b32f8",
    "23.0.0 hexagon-offline": "v6|3088a64b32f8",
    "23.0.0 rtx-cuda-gguf-backend-only": "no fit|543f8467956d",
    "23.0.0 cpu-8gib-no-backends": "no fit|37e0d2b73e36",
    "24.0.0 cpu-2gib-no-runtimes": "v22|0bf043a7ed6d",
    "24.0.0 cpu-16gib-cpu-runtimes": "v22|0bf043a7ed6d",
    "24.0.0 rtx-npu-cuda": "v22|4bd8e827eca3",
    "24.0.0 rtx-no-gpu-runtime": "v22|0bf043a7ed6d",
    "24.0.0 jetson-integrated": "v22|fdfc48a39602",
    "24.0.0 two-gpus-vulkan-rocm": "v22|bdc4dc463584",
    "24.0.0 hexagon-online-qnn": "v22|bda3bd6ffb62",
    "24.0.0 hexagon-offline": "v22|832fb8fc55a1",
    "24.0.0 rtx-cuda-gguf-backend-only": "v22|152ab8fabdef",
    "24.0.0 cpu-8gib-no-backends": "no fit|b4afd9dce865",
}


@pytest.mark.parametrize("seed", range(25))
def test_pinned_results(seed: int) -> None:
    cases = [c for c in CASES if c[0].startswith(f"{seed}.")]
    for case, variants, profile, policy, alias in cases:
        got = outcome(variants, profile, policy, alias)
        if got != EXPECTED[case]:
            out = judge(variants, PROFILES[profile], policy, alias)
            now = str(out) if isinstance(out, NoVariantFits) else out.explain()
            pytest.fail(f"{case}: {got} != {EXPECTED[case]}; now:\n{now}")


def test_the_table_covers_every_case() -> None:
    assert set(EXPECTED) == {c[0] for c in CASES}
    kinds = {v.split("|")[0] == "no fit" for v in EXPECTED.values()}
    assert kinds == {True, False}


if __name__ == "__main__":
    print("EXPECTED: dict[str, str] = {")
    for case, variants, profile, policy, alias in CASES:
        print(f"    \"{case}\": \"{outcome(variants, profile, policy, alias)}\",")
    print("}")
