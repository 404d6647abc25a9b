"""What the embedded cluster of `stillhouse run` listens on (S1).

stillhouse itself runs no server. The Ray dashboard it starts listens on 127.0.0.1 only. Ray
2.60's own gRPC servers (GCS, raylet, core workers, agents) bind every interface and offer no
setting to narrow that; what guards them is Ray's token authentication, which this test checks on
the GCS at the machine's non-loopback address: another token is refused, the cluster's accepted.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil
import pytest
import yaml

from specs import JobSpec

pytestmark = pytest.mark.ray

CONNECT = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='error'); "
           "print('CPUs', ray.cluster_resources()['CPU'])")


def _listeners(pid: int) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of `pid` and its descendants."""
    tree = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in tree]


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def test_dashboard_is_loopback_only_and_the_gcs_wants_the_token():
    import ray

    from cluster.local import embedded_cluster

    spec = JobSpec.model_validate(yaml.safe_load(open("examples/digits.yaml")))
    with embedded_cluster(spec):
        context = ray.get_runtime_context()
        gcs = context.gcs_address
        dashboard_port = int(ray._private.worker._global_node.webui_url.rsplit(":", 1)[1])
        listening = _listeners(os.getpid())
        on_dashboard = {address for address, port, _ in listening if port == dashboard_port}
        assert on_dashboard == {"127.0.0.1"}, listening

        host = gcs.rsplit(":", 1)[0]
        assert not _loopback(host), f"the GCS advertises {gcs}: no non-loopback address to try"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        refused = subprocess.run([sys.executable, "-c", CONNECT, gcs], capture_output=True,
                                 text=True, timeout=120,
                                 env={**env, "RAY_AUTH_MODE": "token",
                                      "RAY_AUTH_TOKEN": "not-this-clusters-token",
                                      # two tries, not Ray's default twenty (one a second)
                                      "RAY_gcs_server_port_wait_time_s": "2"})
        assert refused.returncode != 0 and "Failed to connect" in refused.stderr, refused.stderr
        # the control: the token Ray wrote for this cluster (~/.ray/auth_token) gets in
        accepted = subprocess.run([sys.executable, "-c", CONNECT, gcs], capture_output=True,
                                  text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "token"})
        assert accepted.returncode == 0 and "CPUs" in accepted.stdout, accepted.stderr[-2000:]
