"""One local Ray instance for the tests of onnxprune.scaleout, started once for the package (each start costs some
10 s on two cores) and shut down when its last test is done, so that no later test shares the CPUs with Ray."""

import pytest

RESOURCE = "onnxprune_test_device"  # the local Ray offers 2 of it: latency actors placed by --ray-resource


@pytest.fixture(scope="package")
def local_ray():
    """A local Ray with 2 CPUs (a Ray already initialised in this process is used as it is, and left running)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, resources={RESOURCE: 2}, include_dashboard=False, logging_level="warning",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
