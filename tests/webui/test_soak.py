"""Soak: 50 consecutive jobs through the API, FreeFuse on and off with changing bindings."""

from __future__ import annotations

from test_freefuse_api import tagged

JOBS = 50
RSS_GROWTH_BOUND_MIB = 64  # from job 10 to job 50; measured here: +1.6 MiB on a server of about 1.2 GiB
LIVE_TENSOR_GROWTH_BOUND = 16  # live tensors from the 6th FreeFuse job to the 25th (each call keeps none)


def test_fifty_jobs_leave_no_state_and_no_growth(webui):
    a, b = webui.lora_names[:2]
    bindings = [
        [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog"}],
        [{"lora": a, "words": "dog"}, {"lora": b, "words": "cat"}],
        [{"lora": b, "words": "garden"}, {"lora": a, "words": "cat, dog"}],
    ]
    log_before = len(webui.log())
    counted_before = len(webui.live_tensor_counts())
    off_images, on_images = set(), {}
    warm_rss = None
    for job in range(JOBS):
        if job % 2:
            result = webui.txt2img(tagged(webui), steps=4)
            off_images.add(result.images[0].pixels)
        else:
            subjects = bindings[(job // 2) % len(bindings)]
            args = {"enabled": True, "capture_block": 1, "subjects": subjects}
            result = webui.txt2img(tagged(webui), steps=4, alwayson_scripts={"FreeFuse": {"args": [args]}})
            on_images.setdefault(job // 2 % len(bindings), set()).add(result.images[0].pixels)
        if job == 9:
            warm_rss = webui.rss_mib()
    growth = webui.rss_mib() - warm_rss
    tensors = webui.live_tensor_counts()[counted_before:]  # one count per FreeFuse job, at its start
    tensor_growth = tensors[-1] - tensors[5]
    print(f"\nsoak: {JOBS} jobs, server RSS after job 10 {warm_rss:.0f} MiB, growth to job 50 {growth:+.1f} MiB;")
    print(f"live tensors at FreeFuse jobs 6 and 25: {tensors[5]} and {tensors[-1]} ({tensor_growth:+d})")
    assert len(tensors) == JOBS // 2
    assert growth < RSS_GROWTH_BOUND_MIB
    assert tensor_growth <= LIVE_TENSOR_GROWTH_BOUND, tensors
    assert len(off_images) == 1, "a FreeFuse-off job changed after FreeFuse jobs ran"
    assert all(len(images) == 1 for images in on_images.values()), "the same FreeFuse job gave different images"
    assert len({next(iter(images)) for images in on_images.values()}) == len(bindings)
    soak_log = webui.log()[log_before:]
    assert "FreeFuse: the" not in soak_log and "Traceback" not in soak_log
