"""Shared fixtures: paths, the real data sets (skipped when absent), drawn digits, a live TorchServe."""
import pytest

import catalog  # also puts handlers/ on sys.path: the handler modules are imported by file name
from catalog import DATA_DIR, ROOT
from training.data import has_dataset

ARTIFACTS = ROOT / "tests" / "artifacts"
KINDS = ("integration", "browser", "slow")  # pytest.ini; a test marked with none of them is a unit test


def pytest_collection_modifyitems(items):
    """Tests that use the session's TorchServe or the PostgreSQL server are integration tests;
    tests marked with no kind are unit tests (`make test-fast` runs them alone)."""
    for item in items:
        if {"torchserve", "postgres"} & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(kind) for kind in KINDS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def mnist_test():
    """(images uint8 N x 28 x 28, labels) of the official MNIST test split."""
    if not has_dataset("mnist", DATA_DIR):
        pytest.skip(f"MNIST not found under {DATA_DIR} (a fresh clone has no ../shared/data)")
    from training.data import load_split
    images, labels = load_split("mnist", DATA_DIR, train=False)
    return images[:, 0].numpy(), labels.numpy()


def shipped(model: str):
    """The model's committed weights, or a skip while they are not trained yet."""
    weights = catalog.weights_path(model)
    if not weights.exists():
        pytest.skip(f"{model} has no shipped weights yet (training/weights/{model}.pt)")
    return weights


@pytest.fixture(scope="session")
def cifar_test():
    if not has_dataset("cifar10", DATA_DIR):
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (a fresh clone has no ../shared/data)")
    from training.data import load_cifar10
    return load_cifar10(DATA_DIR, train=False)


def served_default(model: str) -> str:
    """The version the archived manifest makes `model`'s default: `make tune`'s choice on this CPU, or
    models.yaml's (model_store/archive.py mark_defaults)."""
    return catalog.served_defaults()[model]


def start_torchserve(run_dir, models=None, overrides=None):
    """Start the real TorchServe (Java frontend, Python workers) on free ports, serving every archive
    (or `models`), with config.properties' settings changed by `overrides`. Returns its client;
    `client.run_dir` is where its key file, logs and pid live."""
    from serving import server
    if not server.startup_models():
        pytest.fail("no archives in model_store/: `make test` builds them (make archive)")
    client = server.start(run_dir, {**server.free_ports(), **(overrides or {})}, models=models)
    client.run_dir = run_dir
    return client


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory):
    """One TorchServe for the whole session; tests that stop a server start their own."""
    from serving import server
    run_dir = tmp_path_factory.mktemp("torchserve")
    yield start_torchserve(run_dir)
    server.stop(run_dir)
