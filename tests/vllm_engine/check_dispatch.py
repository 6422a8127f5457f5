"""adakv's CUDA worker's wrap of vLLM's CUDA graph dispatch, without a GPU: a full graph is given up for an
eager step only while a compressed request runs part of its prompt; other modes pass through. Prints one JSON
line of what each case returned. Run by tests/test_vllm_engine.py in the vLLM environment."""

from __future__ import annotations

import json

from vllm.config import CUDAGraphMode
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

from adakv.runtimes.vllm import requests
from adakv.runtimes.vllm.cuda_worker import eager_while_compressing
from adakv.runtimes.vllm.requests import ServedRequest, ServedRequests
from adakv.runtimes.vllm.settings import ServingPress


def vllms_dispatch(mode: CUDAGraphMode):
    def dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=0):
        return BatchExecutionDescriptor(
            cg_mode=mode, num_tokens=num_tokens, num_reqs=num_reqs, num_active_loras=num_active_loras
        )

    return dispatch


def main() -> None:
    served = requests._SERVED = ServedRequests(ServingPress("adakv_snapkv", 0.75))
    setting = ServingPress("adakv_snapkv", 0.75)
    served.by_id["decoding"] = ServedRequest("decoding", setting, 100, first_block=0, computed=103, scheduled=1)
    results = {}
    for mode in (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE):
        desc = eager_while_compressing(vllms_dispatch(mode))(4, 4, 1, num_active_loras=0)
        results[f"{mode.name} while decoding"] = desc.cg_mode.name
    served.by_id["prompt"] = ServedRequest("prompt", setting, prompt_len=100, first_block=8, computed=99, scheduled=1)
    for mode in (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE):
        desc = eager_while_compressing(vllms_dispatch(mode))(3, 4, 1, num_active_loras=0)
        results[f"{mode.name} while a prompt runs"] = desc.cg_mode.name
        results[f"{mode.name} while a prompt runs: tokens, requests"] = [desc.num_tokens, desc.num_reqs]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
