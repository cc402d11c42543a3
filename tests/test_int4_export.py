"""Packed INT4 weights in the exported ONNX: packing round trip, exact integers against ModelOpt's
fake quant, ONNX Runtime runs it close to torch, and the file is smaller than the int8 one."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from oracles import activation_step, dq_nodes, quantized_tiny, quantizer_of, torch_logits

from recipes.export import onnx as export
from recipes.export.int4 import int4_tensor, int4_values, pack_int4, unpack_int4
from recipes.export.onnx import export_onnx, read_metadata
from recipes.export.onnx_runner import OnnxCTCModel, lower_qdq_conv_for_ort

warnings.filterwarnings("ignore", category=UserWarning)


def test_pack_unpack_round_trip_and_spec_nibble_order():
    v = np.array([-8, 7, 0, -1, 3], dtype=np.int8)
    raw = pack_int4(v)
    assert raw == bytes([0x78, 0xF0, 0x03])  # -8 = 0x8 low, 7 = 0x7 high; 0 low, -1 = 0xF high; 3, pad
    assert np.array_equal(unpack_int4(raw, 5), v)
    # onnx's own reader agrees on the packed layout
    assert np.array_equal(numpy_helper.to_array(int4_tensor(v.reshape(5, 1), "t")).astype(np.int8).ravel(), v)
    with pytest.raises(ValueError, match="outside int4"):
        pack_int4(np.array([8]))


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    sm = quantized_tiny(weight_bits=4)
    d = tmp_path_factory.mktemp("w4")
    info = export_onnx(sm, d / "tiny_w4.onnx")
    int8_info = export_onnx(sm, d / "tiny_w4_int8.onnx", pack_int4=False)
    return sm, info, int8_info, onnx.load(info["path"])


def test_w4_weights_packed_and_dequantize_to_fake_quant(w4):
    """The INT4 codes are exactly ModelOpt's integer codes; DQ (ONNX Runtime) gives their
    fake-quant values up to float rounding: torch divides the integer by 7/amax, DQ multiplies it
    by amax/7, two roundings that can leave the values up to 2 float32 ulp apart."""
    import onnxruntime as ort

    sm, info, _, proto = w4
    assert info["int4_weights"] > 0 and info["int8_weights"] == 0
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    inits = {i.name: i for i in proto.graph.initializer}
    consts = export.constant_values(proto.graph)
    modules = dict(sm.model.named_modules())
    checked = 0
    for n in dq_nodes(proto):
        name = quantizer_of(n)
        if not name.endswith("weight_quantizer"):
            continue
        init = inits[n.input[0]]
        assert init.data_type == TensorProto.INT4 and len(init.raw_data) == (int(np.prod(init.dims)) + 1) // 2
        layer = modules[name.removesuffix(".weight_quantizer")]
        q = layer.weight_quantizer
        with torch.no_grad():
            fake = q(layer.weight).numpy()
            amax = q.amax.reshape((-1,) + (1,) * (fake.ndim - 1)).numpy()
        codes = np.rint(fake * (7.0 / amax)).astype(np.int8)  # ModelOpt's integers
        ints = int4_values(init)
        ints = ints.T if ints.ndim == 2 else ints  # MatMul layout [in, out] -> nn.Linear [out, in]
        assert np.array_equal(ints, codes), name
        # ONNX Runtime's DequantizeLinear of the packed tensor alone
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        scale = consts[n.input[1]]
        g = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=axis)], "dq", [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(init.dims))],
            [init, numpy_helper.from_array(scale, "s"), int4_tensor(np.zeros(scale.shape, np.int8), "z")])
        g.initializer[0].name = "w"
        sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
                                    .SerializeToString(), providers=["CPUExecutionProvider"])
        dq = sess.run(None, {})[0]
        dq = dq.T if dq.ndim == 2 else dq
        np.testing.assert_array_max_ulp(dq, fake, maxulp=2)
        checked += 1
    assert checked == info["int4_weights"]


def test_w4_onnx_runs_in_ort_like_torch_and_is_smaller(w4):
    """Same integers as the int8 container, so ONNX Runtime's logits agree with it to float
    rounding, and with torch's fake quant within one activation step (as for int8 exports)."""
    sm, info, int8_info, proto = w4
    packed, container = OnnxCTCModel(info["path"]), OnnxCTCModel(int8_info["path"])
    for shape in [(2, 12_000), (1, 20_000)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        ref, got = torch_logits(sm, x), packed.logits(x.numpy())
        np.testing.assert_allclose(got, container.logits(x.numpy()), rtol=0, atol=1e-5)
        err = np.abs(got - ref)
        assert err.max() <= activation_step(sm) and err.mean() <= activation_step(sm) / 10
    weight_bytes = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type == TensorProto.INT4)
    assert int8_info["size_bytes"] - info["size_bytes"] >= 0.45 * weight_bytes  # half a byte saved per weight
    assert "INT4" in read_metadata(info["path"])["container_note"]
    assert lower_qdq_conv_for_ort(onnx.load(info["path"])) == 7  # the CNN and pos conv still get integer kernels


def test_graph_with_changed_ops_keeps_int8_container():
    from recipes.export.int4 import pack_int4_weights

    w = numpy_helper.from_array(np.zeros((2, 2), np.int8), "w")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=1),
             helper.make_node("ReduceMean", ["wd"], ["y"], axes=[0])]
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [w, numpy_helper.from_array(np.ones(2, np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert pack_int4_weights(m, {"w": (-8, 7)}) == 0
    assert m.graph.initializer[0].data_type == TensorProto.INT8 and m.opset_import[0].version == 17
