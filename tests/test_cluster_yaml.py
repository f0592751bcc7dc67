"""cluster.yaml against Ray 2.60's own code, without AWS: Ray's config validation; every node's
image named through AWS's SSM parameter and handed to EC2 by Ray's AWS provider as it is; the IAM
policies in docs/iam granting what Ray's autoscaler calls (``iam:PassRole`` on the workers' role
included); NVIDIA MPS before ``ray start`` on the GPU nodes; torch installed only where it is
missing and checked on the GPU workers; token authentication on every node; the ``aws`` extra
holding what ``ray up`` and ``ray job submit`` import on the laptop. No network, no AWS account."""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

CLUSTER_YAML = ROOT / "cluster.yaml"
IAM = ROOT / "docs" / "iam"
RAY_AWS = Path(ray.__file__).parent / "autoscaler" / "_private" / "aws"
#: An image AWS publishes through SSM: a Deep Learning AMI with an NVIDIA driver, latest release.
SSM_DLAMI = re.compile(r"resolve:ssm:(/aws/service/deeplearning/ami/x86_64/"
                       r"[a-z0-9.-]*nvidia-driver[a-z0-9.-]*/latest/ami-id)")
PROFILE_ARN = re.compile(r"arn:aws:iam::(\d{12}):instance-profile/([\w+=,.@-]+)")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict:
    """The config as Ray's cluster launcher sees it: defaults filled in, validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def node_configs(config: dict) -> dict[str, dict]:
    return {name: t["node_config"] for name, t in config["available_node_types"].items()}


def gpu_node_types(config: dict) -> list[str]:
    return [n for n in config["available_node_types"] if n != config["head_node_type"]]


def policy(name: str) -> dict:
    doc = json.loads((IAM / name).read_text())
    assert doc["Version"] == "2012-10-17", name
    return doc


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def allows(doc: dict, action: str, resource: str) -> bool:
    """Whether an Allow statement of the policy names the action (IAM actions are
    case-insensitive) on the resource, wildcards included."""
    return any(
        s["Effect"] == "Allow"
        and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(s["Action"]))
        and any(fnmatch.fnmatchcase(resource, r) for r in as_list(s["Resource"]))
        for s in doc["Statement"])


def test_passes_rays_validation(config):
    assert config["provider"]["type"] == "aws"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    for name in gpu_node_types(config):
        assert config["available_node_types"][name]["node_config"]["InstanceType"].startswith(("g5", "g6"))


def test_every_node_type_boots_a_gpu_image_named_through_ssm(config):
    images = {name: nc.get("ImageId", "") for name, nc in node_configs(config).items()}
    assert all(SSM_DLAMI.fullmatch(i) for i in images.values()), images
    # One image everywhere: Ray's Docker mode needs the same host tools (Docker) on the head.
    assert len(set(images.values())) == 1, images


def test_rays_aws_provider_hands_the_ssm_image_to_ec2_unchanged(config):
    """Ray replaces only an empty or "latest_dlami" ImageId (aws/config.py ``_check_ami``), and
    ``_create_node`` passes the node config to ``ec2.create_instances`` (RunInstances) as it is:
    EC2 resolves ``resolve:ssm:`` itself."""
    pytest.importorskip("boto3", reason="Ray's AWS provider imports boto3 (pip install -e '.[aws]')")
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    bootstrapped = copy.deepcopy(config)
    aws_config._check_ami(bootstrapped)
    assert node_configs(bootstrapped) == node_configs(config)
    assert config["provider"]["region"] in aws_config.DEFAULT_AMI  # the default it would have used

    launched = []

    class FakeEc2:
        def create_instances(self, **request):
            launched.append(request)
            return [SimpleNamespace(id="i-0", instance_id="i-0", state={"Name": "pending"},
                                    state_reason=None)]

    provider = AWSNodeProvider.__new__(AWSNodeProvider)  # no boto3 session, no credentials
    provider.provider_config = {}
    provider.cluster_name = config["cluster_name"]
    provider.ec2_fail_fast = FakeEc2()
    for name in gpu_node_types(config):
        worker = dict(copy.deepcopy(node_configs(config)[name]), SubnetIds=["subnet-0"],
                      SecurityGroupIds=["sg-0"])  # what `ray up`'s bootstrap adds
        provider._create_node(worker, {"ray-user-node-type": name}, 1)
        assert launched[-1]["ImageId"] == node_configs(config)[name]["ImageId"]
        assert launched[-1]["IamInstanceProfile"] == node_configs(config)[name]["IamInstanceProfile"]


def test_iam_head_may_launch_workers_and_pass_them_their_role(config, raw):
    for name in ("head-policy.json", "worker-policy.json", "trust-policy.json", "launcher-policy.json"):
        assert f"docs/iam/{name}" in CLUSTER_YAML.read_text(), f"cluster.yaml does not point at {name}"
    head, worker, trust, launcher = (policy(f"{n}.json") for n in
                                     ("head-policy", "worker-policy", "trust-policy", "launcher-policy"))
    profiles = {name: PROFILE_ARN.fullmatch(nc["IamInstanceProfile"]["Arn"])
                for name, nc in node_configs(raw).items()}
    assert all(profiles.values()), "every node type names its instance profile by ARN"
    # Each profile carries the role of its name (docs/cluster.md creates them so).
    roles = {name: f"arn:aws:iam::{m[1]}:role/{m[2]}" for name, m in profiles.items()}
    head_type = config["head_node_type"]
    for name in gpu_node_types(config):
        assert roles[name] != roles[head_type]
        assert allows(head, "iam:PassRole", roles[name]), f"the head may not pass {roles[name]}"
    assert allows(launcher, "iam:PassRole", roles[head_type])
    assert not allows(worker, "iam:PassRole", "*")

    # RunInstances with resolve:ssm: needs ssm:GetParameters on the parameter, for whoever calls it.
    region = config["provider"]["region"]
    for nc in node_configs(config).values():
        parameter = f"arn:aws:ssm:{region}::parameter{SSM_DLAMI.fullmatch(nc['ImageId'])[1]}"
        assert allows(head, "ssm:GetParameters", parameter) and allows(launcher, "ssm:GetParameters",
                                                                          parameter)

    # Every EC2 call of Ray's AWS node provider, which the autoscaler on the head makes.
    source = (RAY_AWS / "node_provider.py").read_text()
    calls = set(re.findall(r"\b(?:client|ec2|ec2_fail_fast)\.([a-z]+_[a-z_]+)", source))  # API methods
    assert {"create_instances", "terminate_instances", "create_tags", "describe_instance_types"} <= calls
    actions = {"DescribeInstances"} | {
        "RunInstances" if c == "create_instances" else "".join(w.title() for w in c.split("_"))
        for c in calls}
    missing = [a for a in sorted(actions) if not allows(head, f"ec2:{a}", "*")]
    assert not missing, f"docs/iam/head-policy.json lacks ec2:{missing}, which Ray's autoscaler calls"

    # Both may use the results bucket: Tune uploads checkpoints from the workers.
    for doc in (head, worker):
        assert allows(doc, "s3:ListBucket", "arn:aws:s3:::BUCKET")
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert allows(doc, action, "arn:aws:s3:::BUCKET/bnstudy/results/trials/x.parquet")

    (statement,) = trust["Statement"]
    assert statement["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


def test_mps_starts_before_ray_on_the_gpu_nodes_only(config):
    start = config["worker_start_ray_commands"]
    mps = next(i for i, c in enumerate(start) if "nvidia-cuda-mps-control -d" in c)
    assert mps < next(i for i, c in enumerate(start) if "ray start" in c)
    assert not any("nvidia-cuda-mps-control" in c for c in config["head_start_ray_commands"])


def test_gpu_workers_get_the_gpus_and_check_torch_sees_them(config, tmp_path):
    docker = config["docker"]
    assert "--gpus all" in docker["worker_run_options"]
    assert not any("--gpus" in o for o in docker["run_options"] + docker.get("head_run_options", []))
    check = next(c for c in config["worker_setup_commands"] if "torch.cuda.is_available()" in c)
    # Run here, where torch finds no GPU: the check stops the node's setup and says why.
    proc = subprocess.run(["bash", "-c", check], env=fake_path(tmp_path, python=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "finds no usable GPU" in proc.stderr and "driver >= 580" in proc.stderr, proc.stderr


def fake_path(tmp_path: Path, python: str, python_args: str = "", log: Path | None = None) -> dict:
    """An environment whose ``python`` is the given interpreter and whose ``pip`` only writes its
    arguments to ``log``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{python}" {python_args} "$@"\n')
    (bindir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{log or tmp_path / "pip.log"}"\n')
    for f in ("python", "pip"):
        (bindir / f).chmod(0o755)
    return {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}


def test_setup_installs_torch_only_where_it_is_missing(config, tmp_path):
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        guard = next(i for i, c in enumerate(commands) if "pip install" in c and "torch==" in c)
        project = next(i for i, c in enumerate(commands) if "pip install" in c and "~/bnstudy" in c)
        assert guard < project, "torch must be there before `pip install -e` looks for it"
    guard = next(c for c in config["setup_commands"] if "pip install" in c and "torch==" in c)

    # The pins are what pyproject.toml allows (the newest it allows: what pip would pick).
    requirements = {r.name: r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    pins = re.findall(r"\b(torch|torchvision)==([\w.+]+)", guard)
    assert {name for name, _ in pins} == {"torch", "torchvision"}, guard
    for name, version in pins:
        assert requirements[name].specifier.contains(version), (name, version, str(requirements[name]))

    log = tmp_path / "pip.log"
    # torch present (this interpreter has it): nothing installed.
    subprocess.run(["bash", "-c", guard], env=fake_path(tmp_path, sys.executable, log=log),
                   check=True, timeout=120)
    assert not log.exists(), log.read_text()
    # torch missing (no site-packages): installed once, pinned.
    subprocess.run(["bash", "-c", guard], env=fake_path(tmp_path, sys.executable, "-S", log=log),
                   check=True, timeout=120)
    assert log.read_text().split() == ["install", "-q", "torch==2.14.1", "torchvision==0.29.1"]


def test_token_auth_on_every_node(config, raw):
    # ray up ships no token: this file copies the laptop's to the head (and the head's to workers).
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(re.search(r"RAY_AUTH_MODE=token ray start", c) for c in starts), starts
    assert any("export RAY_AUTH_MODE=token" in c and "bashrc" in c for c in config["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def test_aws_extra_installs_what_ray_up_and_ray_job_import(raw):
    extras = pyproject()["project"]["optional-dependencies"]
    aws = {Requirement(r).name: Requirement(r) for r in extras["aws"]}
    assert "boto3" in aws
    # `ray job submit` refuses to run without ray[default] (dashboard/modules/job/sdk.py).
    assert "default" in aws["ray"].extras
    # The laptop's Ray is the cluster image's.
    image_ray = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+(-gpu)?", raw["docker"]["image"])[1]
    assert str(aws["ray"].specifier) == f"=={image_ray}"

    # What Ray's AWS provider imports beyond the standard library and Ray itself: boto3, botocore
    # (a requirement of boto3) and packaging (one of Ray's).
    imported = set()
    for path in RAY_AWS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"ray"}
    assert third_party == {"boto3", "botocore", "packaging"}, third_party
