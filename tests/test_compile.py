"""torch.compile and torch.export of a whole model using every fastreg op family: one
graph with no break, compiled == eager for the same seed, an exported eval-mode model."""

import copy
import io

import pytest
import torch
from all_ops_model import AllOps, batch, loss_fn, train
from conftest import MASK_MODES, requires_extension

from fastreg import _ops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MASK_MODES)
def test_explain_reports_one_graph_and_no_break(mode):
    x, y = batch()
    explanation = torch._dynamo.explain(loss_fn)(AllOps(mode), x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def fastreg_ops_in(graph_module):
    """The fastreg operators a graph calls, as "fastreg.name"."""
    names = {str(node.target).removesuffix(".default") for node in graph_module.graph.nodes}
    return {name for name in names if name.startswith("fastreg.")}


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_equals_eager_for_the_same_seed(mode, backend):
    """Same seed, same masks: the fastreg ops draw their (seed, offset) with torch.randint
    from the default generator, compiled or not, and the losses and weights after three
    SGD steps agree (bit for bit with aot_eager; inductor's own conv, matmul and
    cross-entropy code round differently)."""
    torch.manual_seed(0)
    eager_model = AllOps(mode)
    compiled_model = copy.deepcopy(eager_model)
    eager = train(eager_model, 3, seed=7)
    compiled = train(
        compiled_model, 3, seed=7, step_fn=torch.compile(loss_fn, fullgraph=True, backend=backend)
    )
    pairs = list(zip(eager, compiled)) + list(
        zip(eager_model.parameters(), compiled_model.parameters())
    )
    for a, b in pairs:
        if backend == "aot_eager":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_extension
def test_compiled_graph_calls_the_fastreg_operators():
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x, y = batch()
    torch.compile(loss_fn, fullgraph=True, backend=backend)(AllOps(), x, y)
    # Dropout2d draws its per-channel flags with dropout_mask
    assert fastreg_ops_in(graphs[0]) == {
        "fastreg.bias_act_dropout_fwd",
        "fastreg.bias_dropout_add_fwd",
        "fastreg.dropout_fwd",
        "fastreg.dropout_mask",
        "fastreg.penalty",
    }


def test_export_of_an_eval_model_runs_saves_and_loads():
    torch.manual_seed(0)
    model = AllOps().eval()
    x, _ = batch()
    program = torch.export.export(model, (x,))
    expected = model(x)
    assert torch.equal(program.module()(x), expected)
    if _ops.HAVE_EXTENSION:
        # In eval mode the fused ops still run (one kernel for the bias and residual adds);
        # dropout and channel dropout are the identity and leave no node.
        assert fastreg_ops_in(program.graph_module) == {
            "fastreg.bias_act_dropout_fwd",
            "fastreg.bias_dropout_add_fwd",
        }
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert torch.equal(torch.export.load(buffer).module()(x), expected)
