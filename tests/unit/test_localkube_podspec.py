"""The test kubelet's mount mapping: container paths in argv, env and workingDir become local paths."""

from __future__ import annotations

from pathlib import Path

from localkube.podspec import substitute

POD = Path("/tmp/localkube/pods/ns_p")
MOUNTS = {
    "/tmp": POD / "volumes/tmp",
    "/etc/finetune": POD / "volumes/finetune",
    "/dev/termination-log": POD / "termination/trainer",
    "/work": POD / "volumes/work",
}


def test_each_mount_path_is_replaced_once() -> None:
    # The local path of /etc/finetune lies under /tmp, itself a mount: it must not be mapped again.
    assert substitute("/etc/finetune/job.json", MOUNTS) == f"{POD}/volumes/finetune/job.json"
    assert substitute("/dev/termination-log", MOUNTS) == f"{POD}/termination/trainer"
    assert substitute("TMP=/tmp:/work/.cache", MOUNTS) == f"TMP={POD}/volumes/tmp:{POD}/volumes/work/.cache"


def test_only_whole_path_segments() -> None:
    assert substitute("/workdir/x", MOUNTS) == "/workdir/x"
    assert substitute("/work", MOUNTS) == f"{POD}/volumes/work"
    assert substitute("nothing here", {}) == "nothing here"
