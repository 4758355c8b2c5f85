// The penalty API's fast path from Python (fastreg/penalty.py): the per-tensor work of
// a call (type, dtype, layout and device checks, the coefficient lists, the gradients
// penalty_grad_ creates) done here in one loop, then the operator called through the
// dispatcher (so autograd, the Python dispatch modes and the device kernels see the same
// call as from torch.ops). Each function answers None / False when the call is not one
// it takes (an element that is not exactly a Tensor or Parameter, a tensor subclass or a
// bad one, a TorchFunctionMode, a device without compiled kernels, a coefficient that is
// not a plain non-negative finite float or int): Python then takes the general path,
// which checks everything again and raises with the argument's name. Nothing is
// changed before a call is known to be taken.
//
// module_key walks an nn.Module's tree (_parameters and _modules, in the order of
// named_parameters) and hashes what a parameter selection depends on, so that
// fastreg.penalty can keep a selection until the module changes (see penalty.py).
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "ops/op_handles.h"
#include "ops/penalty.h"

namespace fastreg {
namespace {

PyTypeObject* tensor_type() {
  static PyTypeObject* type = reinterpret_cast<PyTypeObject*>(
      pybind11::object(pybind11::module_::import("torch").attr("Tensor")).release().ptr());
  return type;
}

PyTypeObject* parameter_type() {
  static PyTypeObject* type = reinterpret_cast<PyTypeObject*>(
      pybind11::object(pybind11::module_::import("torch.nn").attr("Parameter")).release().ptr());
  return type;
}

bool has_kernels(const c10::Device& device) {
  if (device.is_cpu() || device.is_meta()) return true;
#ifdef FASTREG_WITH_CUDA
  if (device.is_cuda()) return true;
#endif
  return false;
}

// The tensors of a Python list or tuple, borrowed: at::Tensor values that share the
// Python objects' TensorImpls without taking a reference (c10::MaybeOwned's borrow), since
// the first C++ reference to a tensor that has a Python object also takes a reference to
// that object (under the GIL): 0.1 us a tensor, twice a call. The sequence, held by the
// caller for the whole call, keeps them alive; nothing here runs Python code that could
// change it. The operators take their own references where they keep a tensor (a saved
// parameter, a temporary).
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void reserve(size_t n) { tensors_.reserve(n); }
  void push_back(const at::Tensor& t) {
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  size_t size() const { return tensors_.size(); }
  const at::Tensor& operator[](size_t i) const { return tensors_[i]; }
  at::Tensor& operator[](size_t i) { return tensors_[i]; }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// The tensors of a list or tuple whose elements are all plain tensors or Parameters,
// checked as the operators check them; false when the call is not for the fast path.
bool unpack_tensors(PyObject* seq, BorrowedTensors& out) {
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return false;
  if (at::impl::torch_function_mode_enabled()) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n == 0) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PyTypeObject* const tensor = tensor_type();
  PyTypeObject* const parameter = parameter_type();
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyTypeObject* type = Py_TYPE(items[i]);
    if (type != tensor && type != parameter) return false;
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    if (!is_penalty_dtype(t.scalar_type()) || t.layout() != at::kStrided || t.is_nested() ||
        t.key_set().has(c10::DispatchKey::Python)) {
      return false;
    }
    if (i > 0 && t.device() != out[0].device()) return false;
    out.push_back(t);
  }
  return has_kernels(out[0].device());
}

// A coefficient given as a Python float or int (not bool), non-negative and finite.
bool coefficient(PyObject* obj, double& value) {
  if (PyFloat_CheckExact(obj)) {
    value = PyFloat_AS_DOUBLE(obj);
  } else if (PyLong_CheckExact(obj)) {
    value = PyLong_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return value >= 0.0 && std::isfinite(value);
}

pybind11::object penalty_fast(pybind11::handle params, pybind11::handle l1_obj,
                              pybind11::handle l2_obj) {
  BorrowedTensors tensors;
  double l1 = 0.0, l2 = 0.0;
  if (!coefficient(l1_obj.ptr(), l1) || !coefficient(l2_obj.ptr(), l2) ||
      !unpack_tensors(params.ptr(), tensors)) {
    return pybind11::none();
  }
  const std::vector<double> l1s(tensors.size(), l1), l2s(tensors.size(), l2);
  return pybind11::reinterpret_steal<pybind11::object>(
      THPVariable_Wrap(op::penalty().call(tensors.list(), l1s, l2s)));
}

bool penalty_grad_fast(pybind11::handle params, pybind11::handle l1_obj, pybind11::handle l2_obj) {
  BorrowedTensors tensors;
  double l1 = 0.0, l2 = 0.0;
  if (!coefficient(l1_obj.ptr(), l1) || !coefficient(l2_obj.ptr(), l2) ||
      !unpack_tensors(params.ptr(), tensors)) {
    return false;
  }
  if (l1 == 0.0 && l2 == 0.0) return true;  // nothing to add, no gradient created
  // Gradients as the general path wants them (strided, plain, the parameter's shape,
  // dtype and device); all checked before any missing one is created. Read from the
  // TensorImpl: Tensor::grad() also asks autograd whether the tensor is a leaf (for its
  // warning about a non-leaf's missing gradient), a virtual call a tensor; a missing
  // gradient is read through it below, so the warning is the one p.grad gives.
  bool missing = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& g = t.unsafeGetTensorImpl()->grad();
    if (!g.defined()) {
      missing = true;
      continue;
    }
    if (g.layout() != at::kStrided || g.key_set().has(c10::DispatchKey::Python) ||
        g.scalar_type() != t.scalar_type() || g.device() != t.device() || g.sizes() != t.sizes()) {
      return false;
    }
  }
  at::NoGradGuard no_grad;
  if (missing) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      at::Tensor& t = tensors[i];
      if (!t.grad().defined()) t.mutable_grad() = at::zeros_like(t);
    }
  }
  BorrowedTensors grads;  // each held by its parameter
  grads.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    grads.push_back(tensors[i].unsafeGetTensorImpl()->grad());
  }
  const std::vector<double> l1s(tensors.size(), l1), l2s(tensors.size(), l2);
  op::penalty_grad_().call(grads.list(), tensors.list(), l1s, l2s);
  return true;
}

bool prox_l1_fast(pybind11::handle params, pybind11::handle threshold_obj) {
  BorrowedTensors tensors;
  double threshold = 0.0;
  if (!coefficient(threshold_obj.ptr(), threshold) || !unpack_tensors(params.ptr(), tensors)) {
    return false;
  }
  at::NoGradGuard no_grad;
  op::prox_l1_().call(tensors.list(), std::vector<double>(tensors.size(), threshold));
  return true;
}

// ---- The module key ----

// The walk follows named_modules() and named_parameters() (in their order) and feeds
// what a selection depends on to `mix`: each module's class, the names and values of its
// _parameters and _modules, and for each parameter its requires_grad, dtype, device and
// number of dimensions (and each module's address, which changes nothing that matters but
// costs nothing). A module or parameter met twice (shared, tied) is simply hashed again:
// the walk is the same from call to call as long as the tree is. With `refs`, the objects
// whose addresses the key holds are appended to it (classes, names, parameters): the
// caller keeps them alive, so that such an address in a later walk can only be that same
// object. Modules are not kept (a cache must not keep a model alive, nor anything that
// refers back to it); a new module at a dead one's address, of the same class, with the
// same names and the same parameter objects, selects the same tensors. A tree deeper than
// 512 or with more than a million entries is not keyed.
// Whether `type` looks attributes up with object.__getattribute__ (no override).
bool has_generic_getattribute(PyTypeObject* type) {
  static PyObject* const name = PyUnicode_InternFromString("__getattribute__");
  static PyObject* const generic =
      _PyType_Lookup(&PyBaseObject_Type, name);  // object's slot wrapper, immortal
  return _PyType_Lookup(type, name) == generic;
}

// Whether `type`'s instances give their _parameters and _modules from their own dict:
// the class keeps object's __getattribute__ and has no data descriptor of either name,
// the only things PyObject_GenericGetAttr looks at before the instance dict. Then the
// walk reads that dict directly: the class lookups were a third of the walk. A verified
// class is remembered with its version tag, which CPython renews when the class or a
// base changes (and never gives to another class). Called with the GIL held.
bool reads_instance_dict(PyTypeObject* type, PyObject* name1, PyObject* name2) {
  static std::unordered_map<PyTypeObject*, unsigned int> verified;
  auto valid_tag = [](PyTypeObject* t) {
#ifdef Py_TPFLAGS_VALID_VERSION_TAG
    if (!PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG)) return false;
#endif
    return t->tp_version_tag != 0;
  };
  auto it = verified.find(type);
  if (it != verified.end() && valid_tag(type) && it->second == type->tp_version_tag) {
    return true;
  }
  auto no_data_descriptor = [type](PyObject* name) {
    PyObject* descriptor = _PyType_Lookup(type, name);  // borrowed
    return descriptor == nullptr || Py_TYPE(descriptor)->tp_descr_set == nullptr;
  };
  const bool plain =
      has_generic_getattribute(type) && no_data_descriptor(name1) && no_data_descriptor(name2);
  if (plain && valid_tag(type)) {  // (the lookups gave it a tag when they could)
    verified[type] = type->tp_version_tag;
  } else if (it != verified.end()) {
    verified.erase(it);
  }
  return plain;
}

struct KeyWalk {
  uint64_t hash = 0x9e3779b97f4a7c15ULL;
  PyObject* refs = nullptr;  // a list, or null
  int64_t visits = 0;
  bool ok = true;
  PyObject* parameters_name = nullptr;
  PyObject* modules_name = nullptr;

  // (h ^ v) * odd: for a fixed v a bijection of h, for a fixed h one of v, so two walks of
  // the same length that differ in one entry always end in different keys (a replaced
  // parameter, a flipped requires_grad). One multiply on the chain of dependent steps (a
  // splitmix64 step per entry has three); finished() spreads the bits once.
  void mix(uint64_t v) { hash = (hash ^ v) * 0x9e3779b97f4a7c15ULL; }

  uint64_t finished() const {
    uint64_t z = hash;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  void object(PyObject* obj) {
    mix(reinterpret_cast<uintptr_t>(obj));
    if (refs != nullptr && PyList_Append(refs, obj) != 0) ok = false;
  }

  // module.<name> if it is a dict (borrowed: the module holds it), else null. A class
  // with a __getattr__ (nn.Module has one) makes PyObject_GetAttr go through a Python-
  // level __getattribute__ call: where the class keeps object's __getattribute__, the
  // generic lookup is the same one without that call (0.1 us a module).
  PyObject* dict_attr(PyObject* module, PyObject* name, bool generic) {
    PyObject* value =
        generic ? PyObject_GenericGetAttr(module, name) : PyObject_GetAttr(module, name);
    if (value == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    Py_DECREF(value);
    return PyDict_Check(value) ? value : nullptr;
  }

  // module.__dict__[name] if it is a dict (borrowed: the module holds its dict), else null
  static PyObject* instance_dict_entry(PyObject* module, PyObject* name) {
    PyObject* dict = PyObject_GenericGetDict(module, nullptr);
    if (dict == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    PyObject* value = PyDict_GetItemWithError(dict, name);  // borrowed
    Py_DECREF(dict);
    if (value == nullptr) PyErr_Clear();
    return value != nullptr && PyDict_Check(value) ? value : nullptr;
  }

  void module(PyObject* m, int depth) {
    if (!ok) return;
    if (depth > 512 || ++visits > 1000000) {
      ok = false;
      return;
    }
    mix(reinterpret_cast<uintptr_t>(m));
    object(reinterpret_cast<PyObject*>(Py_TYPE(m)));
    PyObject* params = nullptr;
    PyObject* children = nullptr;
    if (reads_instance_dict(Py_TYPE(m), parameters_name, modules_name)) {
      params = instance_dict_entry(m, parameters_name);
      children = instance_dict_entry(m, modules_name);
    }
    if (params == nullptr || children == nullptr) {  // not there: what getattr finds
      const bool generic = has_generic_getattribute(Py_TYPE(m));
      params = dict_attr(m, parameters_name, generic);
      children = dict_attr(m, modules_name, generic);
    }
    if (params == nullptr || children == nullptr) {
      ok = false;
      return;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    mix(2);
    while (ok && PyDict_Next(params, &pos, &key, &value)) {
      object(key);
      object(value);
      if (value == Py_None) continue;
      if (!THPVariable_Check(value)) {
        ok = false;
        return;
      }
      const at::Tensor& t = THPVariable_Unpack(value);
      const c10::Device device = t.device();
      mix(static_cast<uint64_t>(t.requires_grad()) | (static_cast<uint64_t>(t.scalar_type()) << 1) |
          (static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 9) |
          (static_cast<uint64_t>(static_cast<uint8_t>(device.index())) << 17) |
          (static_cast<uint64_t>(t.dim()) << 25));
    }
    pos = 0;
    mix(3);
    while (ok && PyDict_Next(children, &pos, &key, &value)) {
      object(key);
      if (value == Py_None) {
        object(value);
        continue;
      }
      module(value, depth + 1);
    }
    mix(4);
  }
};

// The key of `module`'s parameter selection, an int; None when the tree cannot be
// walked this way (then nothing is cached).
pybind11::object module_key(pybind11::handle module, pybind11::handle refs) {
  static PyObject* parameters_name = PyUnicode_InternFromString("_parameters");
  static PyObject* modules_name = PyUnicode_InternFromString("_modules");
  KeyWalk walk;
  walk.parameters_name = parameters_name;
  walk.modules_name = modules_name;
  if (!refs.is_none()) {
    if (!PyList_CheckExact(refs.ptr())) throw pybind11::type_error("refs must be a list");
    walk.refs = refs.ptr();
  }
  walk.module(module.ptr(), 0);
  if (PyErr_Occurred()) throw pybind11::error_already_set();
  if (!walk.ok) return pybind11::none();
  return pybind11::int_(walk.finished());
}

}  // namespace

void bind_penalty_front(pybind11::module_& m) {
  m.def("penalty_fast", torch::wrap_pybind_function(penalty_fast));
  m.def("penalty_grad_fast", torch::wrap_pybind_function(penalty_grad_fast));
  m.def("prox_l1_fast", torch::wrap_pybind_function(prox_l1_fast));
  m.def("module_key", torch::wrap_pybind_function(module_key));
}

}  // namespace fastreg
