import jax
import pytest
from jax.sharding import PartitionSpec as P

from lf_jax.distributed.mesh import MeshShapeError, describe_mesh, make_mesh, resolve_mesh_shape
from lf_jax.distributed.rules import logical_to_mesh_axes, named_sharding


def test_conftest_gives_eight_cpu_devices():
    assert jax.device_count() == 8
    assert jax.default_backend() == "cpu"


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"data": 8}, {"data": 8}),
        ({"data": 2, "model": 4}, {"data": 2, "model": 4}),
        ({"data": -1, "model": 2}, {"data": 4, "model": 2}),
        ({"data": 4, "model": -1}, {"data": 4, "model": 2}),
    ],
)
def test_make_mesh_shapes(shape, expected):
    mesh = make_mesh(shape)
    assert dict(mesh.shape) == expected
    assert mesh.axis_names == tuple(expected)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"data": 3, "model": -1}, "does not divide the 8"),
        ({"data": 2, "model": 2}, "needs 4 devices but 8"),
        ({"data": -1, "model": -1}, "only one mesh axis may be -1"),
        ({"data": 0}, "mesh axis 'data' has size 0"),
        ({"data": 2.5}, "mesh axis 'data' has size 2.5"),
        ({}, "mesh shape is empty"),
    ],
)
def test_bad_mesh_shapes_name_the_problem(shape, message):
    with pytest.raises(MeshShapeError, match=message):
        resolve_mesh_shape(shape, 8)


def test_describe_mesh():
    text = describe_mesh(make_mesh({"data": 2, "model": 4}))
    assert "data=2 x model=4" in text and "8 cpu" in text


def test_logical_rules_map_names_to_mesh_axes():
    assert logical_to_mesh_axes(("batch", "embed")) == P("data", None)
    assert logical_to_mesh_axes(("vocab", "embed")) == P("model", None)
    assert logical_to_mesh_axes(("batch", None, "mlp")) == P("data", None, "model")


def test_rules_drop_axes_the_mesh_lacks_and_repeats():
    mesh = make_mesh({"data": 8})
    assert logical_to_mesh_axes(("batch", "mlp"), mesh=mesh) == P("data", None)
    rules = {"a": ("data", "model"), "b": "data"}
    assert logical_to_mesh_axes(("a", "b"), rules) == P(("data", "model"), None)


def test_unknown_logical_axis_is_named():
    with pytest.raises(KeyError, match="logical axis 'nope'"):
        logical_to_mesh_axes(("nope",))


def test_named_sharding_places_array():
    mesh = make_mesh({"data": 2, "model": 4})
    sharding = named_sharding(mesh, ("batch", "mlp"))
    x = jax.device_put(jax.numpy.zeros((4, 8)), sharding)
    assert x.sharding.shard_shape(x.shape) == (2, 2)
