"""Bounded, allow-listed unpickling: the base of the EDM importer and of the CIFAR-10 reader.

Restricting ``find_class`` keeps code out of a pickle, but not every hazard. This module adds the
rest, for streams that are read whole into memory first:

* **No preallocation from declared sizes.** CPython's C unpickler grows its memo table to the
  index an opcode names and zero-fills it (a 10-byte ``LONG_BINPUT 2**27`` costs 2 GB and 4 s);
  :class:`BoundedUnpickler` derives from the pure-Python ``pickle._Unpickler``, whose memo is a
  dict and whose reads come from an :class:`io.BytesIO` (a declared length never allocates more
  than the bytes that are there).
* **Bounded work.** Every call a stream makes (``REDUCE``, ``NEWOBJ``, ``BUILD``) is charged the
  sizes of its arguments against a budget of :attr:`~BoundedUnpickler.WORK_PER_BYTE` units per byte
  of the stream: calling ``set(big_list)`` once per three-byte ``BINGET``/``REDUCE`` pair, which
  would make the work quadratic in the file size, runs out of budget instead.
* **No hash or compare bombs.** A tuple's hash and equality recurse into its items; a tuple that
  holds the previous one twice, N times over, takes 2^N steps to hash (as a dict key, in a set).
  The unpickler counts the nodes of every tuple it builds, shared references included, and refuses
  more than :attr:`~BoundedUnpickler.MAX_TUPLE_NODES`. Integers are limited to
  :attr:`~BoundedUnpickler.MAX_INT_BYTES` bytes (``int`` hashing and parsing are not free either).
* **Data-only targets.** ``BUILD`` (``__setstate__`` / attribute assignment) is allowed only on the
  subclass's own stand-in classes, never on a tensor (``Tensor.__setstate__`` calls ``set_`` on a
  caller-given storage geometry), a function or a class; ``SETITEM(S)`` only on dicts, ``APPEND(S)``
  only on lists, ``ADDITEMS`` only on sets; ``NEWOBJ`` / ``INST`` / ``OBJ`` only on the subclass's
  stand-ins.

:class:`PlainDType` is the one numpy stand-in both readers share: numpy's own ``dtype.__setstate__``
accepts a state declaring object fields, which lets a pickle turn its bytes into pointers (a
595-byte file crashed the EDM importer with a segmentation fault). :class:`PlainDType` accepts only
the builtin numeric types (booleans, integers, floats) in the state numpy writes for them, and is
never handed to numpy.
"""

from __future__ import annotations

import io
import pickle
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

import numpy as np

__all__ = ["BoundedUnpickler", "DryScan", "PlainDType", "RefusedError", "SealedCallable", "scan_pickle", "short_repr"]

# The pure-Python unpickler (see the module docstring for why not the C one).
_PyUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxarray = _SHORT.maxdict = 6
_SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdeque = 6
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 60


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` in at most ``limit`` characters, at bounded cost whatever ``value`` holds.

    :mod:`reprlib` looks at most a few items per level and a few levels deep, so a structure with
    shared references (whose full repr would be exponentially long) costs no more than a small one.
    """
    try:
        text = _SHORT.repr(value)
    except Exception:  # a stand-in whose __repr__ fails: name its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RefusedError(pickle.UnpicklingError):
    """A stand-in refused what a pickle asked of it (each reader maps it to its "unsafe" error)."""


class _Sealed(type):
    """Metaclass forbidding attribute assignment on the class object itself."""

    def __setattr__(cls, name: str, value: Any) -> NoReturn:
        raise RefusedError(f"refusing to set attribute {name!r} on {cls.__name__}")

    def __delattr__(cls, name: str) -> NoReturn:
        raise RefusedError(f"refusing to delete attribute {name!r} on {cls.__name__}")


class SealedCallable(metaclass=_Sealed):
    """One of our functions, as a pickle may call it: no ``__dict__``, no attribute assignment."""

    __slots__ = ("_fn",)
    _fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise RefusedError(f"refusing to set attribute {name!r} on an allowed function")

    def __repr__(self) -> str:
        return f"<safe {self._fn.__name__}>"


# Builtin numeric dtypes by numpy's pickled name ('f8', 'u1', ...; numpy also accepts 'b1' for bool).
_PLAIN_DTYPES: dict[str, np.dtype] = {
    np.dtype(code).str[1:]: np.dtype(code)
    for code in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
}
_BYTE_ORDERS = {"<", ">", "=", "|"}


class PlainDType(metaclass=_Sealed):
    """Stand-in for ``numpy.dtype`` in a pickle: a builtin boolean, integer or float type, nothing else.

    numpy pickles a dtype as ``numpy.dtype(name, align, copy)`` followed by ``BUILD`` with the state
    ``(version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])``. A name
    outside the builtin numeric types is refused when the stand-in is created; a state with a
    subarray, fields, names, an item size, alignment, flags or metadata of its own is refused in
    :meth:`__setstate__`. :attr:`dtype` is the equivalent numpy dtype (byte order applied).
    """

    __slots__ = ("dtype",)
    dtype: np.dtype

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if isinstance(name, bytes):  # Python 2 pickles read with encoding='bytes'
            name = name.decode("ascii", errors="replace")
        if not isinstance(name, str) or name not in _PLAIN_DTYPES:
            raise RefusedError(
                f"refusing numpy dtype {short_repr(name)}: only builtin boolean, integer and float types "
                f"({', '.join(sorted(_PLAIN_DTYPES))}) are allowed"
            )
        if align not in (0, 1) or copy not in (0, 1):
            raise RefusedError(f"malformed numpy dtype arguments {short_repr((align, copy))}")
        object.__setattr__(self, "dtype", _PLAIN_DTYPES[name])

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise RefusedError(f"refusing to set attribute {name!r} on a numpy dtype")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or not 7 <= len(state) <= 9:
            raise RefusedError(f"malformed numpy dtype state {short_repr(state)}")
        version, order, subarray, names, fields, elsize, alignment = state[:7]
        flags = state[7] if len(state) > 7 else 0
        metadata = state[8] if len(state) > 8 else None
        if isinstance(order, bytes):
            order = order.decode("ascii", errors="replace")
        if (
            version not in (1, 2, 3, 4)
            or order not in _BYTE_ORDERS
            or (order == "|") != (self.dtype.itemsize == 1)
            or subarray is not None
            or names is not None
            or fields is not None
            or elsize not in (-1, self.dtype.itemsize)
            or alignment not in (-1, self.dtype.alignment)
            or flags != 0
            or metadata not in (None, {})
        ):
            raise RefusedError(
                f"refusing numpy dtype state {short_repr(state)}: only plain {self.dtype} "
                "(no fields, subarray, flags or metadata) is allowed"
            )
        if order in "<>":
            object.__setattr__(self, "dtype", self.dtype.newbyteorder(order))

    def __repr__(self) -> str:
        return f"<dtype {self.dtype.str}>"


def _is(value: Any, classes: tuple[type, ...]) -> bool:
    """``type(value)`` is one of ``classes`` (by identity: no hashing, no subclass checks)."""
    kind = type(value)
    return any(kind is cls for cls in classes)


class BoundedUnpickler(_PyUnpickler):  # type: ignore[misc]
    """Pure-Python unpickler with a work budget and data-only targets; see the module docstring.

    Subclasses set :meth:`find_class` (the allow-list), :attr:`new_classes`, :attr:`build_classes`
    and :attr:`mapping_classes`, and the two error types. Everything refused raises
    :attr:`unsafe_error` (something that could run code or corrupt memory) or :attr:`format_error`
    (malformed, or more work than the stream's size allows).
    """

    WORK_PER_BYTE: ClassVar[int] = 4
    """Budget of work units (argument items) per byte of the stream."""
    WORK_BASE: ClassVar[int] = 1 << 16
    """Budget every stream gets on top (for tiny streams)."""
    MAX_TUPLE_NODES: ClassVar[int] = 10_000
    """Largest tuple, counting nested tuples' nodes every time they occur."""
    MAX_INT_BYTES: ClassVar[int] = 16
    """Largest integer, in bytes of its two's-complement encoding."""

    new_classes: ClassVar[tuple[type, ...]] = ()
    """Classes ``NEWOBJ`` / ``NEWOBJ_EX`` / ``INST`` / ``OBJ`` may instantiate (with no arguments)."""
    build_classes: ClassVar[tuple[type, ...]] = ()
    """Exact types ``BUILD`` may call ``__setstate__`` on (each must define it)."""
    mapping_classes: ClassVar[tuple[type, ...]] = (dict, OrderedDict)
    """Exact types ``SETITEM`` / ``SETITEMS`` may fill."""
    unsafe_error: ClassVar[type[Exception]] = pickle.UnpicklingError
    format_error: ClassVar[type[Exception]] = pickle.UnpicklingError

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(_PyUnpickler.dispatch)

    def __init__(self, data: bytes | io.BytesIO, *, encoding: str = "ASCII") -> None:
        """Read from ``data`` (a :class:`io.BytesIO` is read from its current position)."""
        stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
        super().__init__(stream, encoding=encoding)
        self.work_left = self.WORK_PER_BYTE * stream.getbuffer().nbytes + self.WORK_BASE
        # id -> (tuple, node count); holding the tuple keeps its id from being reused.
        self._tuple_nodes: dict[int, tuple[tuple[Any, ...], int]] = {}

    # ---- helpers --------------------------------------------------------------------------------

    def arg_cost(self, value: Any) -> int:
        """What passing ``value`` to a call costs: 1 + its length for strings and builtin containers.

        Subclasses whose allowed callables accept other iterables must count them here.
        """
        if isinstance(value, str | bytes | bytearray | list | tuple | dict | set | frozenset):
            return 1 + len(value)
        return 1

    def charge(self, units: int, what: str) -> None:
        """Spend ``units`` of the budget on ``what``; :attr:`format_error` when it runs out."""
        self.work_left -= units
        if self.work_left < 0:
            raise self.format_error(
                f"refusing {what}: the pickle asks for more work than a file of its size can need "
                "(the same large object used over and over?)"
            )

    def _charge_call(self, args: Any, what: str) -> tuple[Any, ...]:
        if type(args) is not tuple:
            raise self.format_error(f"{what} arguments are {type(args).__name__}, not a tuple")
        self.charge(1 + sum(self.arg_cost(a) for a in args), what)
        return args

    def _check_new(self, cls: Any, args: Any, what: str) -> None:
        if not any(cls is allowed for allowed in self.new_classes):
            raise self.unsafe_error(f"refusing {what} of {short_repr(cls)}: not one of the importer's stand-ins")
        if args:
            raise self.unsafe_error(f"refusing {what} of {cls.__name__} with {len(args)} argument(s)")
        self.charge(1, what)

    def _tuple(self, items: Any) -> tuple[Any, ...]:
        nodes = 1
        for item in items:
            if type(item) is tuple and item:  # one of ours; any other nested tuple is refused
                nodes += self._tuple_nodes.get(id(item), (item, self.MAX_TUPLE_NODES))[1]
            else:
                nodes += 1
        if nodes > self.MAX_TUPLE_NODES:
            raise self.format_error(
                f"refusing a tuple of {nodes} nested items (at most {self.MAX_TUPLE_NODES}; shared references?)"
            )
        result = tuple(items)
        if result:
            self._tuple_nodes[id(result)] = (result, nodes)
        return result

    def _int(self, value: int) -> int:
        if value.bit_length() > 8 * self.MAX_INT_BYTES:
            raise self.format_error(f"refusing an integer of {value.bit_length()} bits")
        return value

    # ---- calls ----------------------------------------------------------------------------------

    def load_reduce(self) -> None:
        stack = self.stack
        args = self._charge_call(stack.pop(), "a call (REDUCE)")
        stack[-1] = stack[-1](*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args, "NEWOBJ")
        self.append(cls.__new__(cls))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args or kwargs, "NEWOBJ_EX")
        self.append(cls.__new__(cls))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ
        self._check_new(klass, args, "INST/OBJ")
        self.append(klass.__new__(klass))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not _is(inst, self.build_classes):
            raise self.unsafe_error(f"refusing BUILD (__setstate__) on {type(inst).__name__}")
        self.charge(self.arg_cost(state), "BUILD")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build

    # ---- containers -----------------------------------------------------------------------------

    def _target(self, classes: tuple[type, ...], what: str) -> Any:
        target = self.stack[-1]
        if not _is(target, classes):
            raise self.unsafe_error(f"refusing {what} on {type(target).__name__}")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(self.mapping_classes, "SETITEM")[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(self.mapping_classes, "SETITEMS")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_tuple(self) -> None:
        items = self.pop_mark()  # first: it replaces self.stack and self.append
        self.append(self._tuple(items))

    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self) -> None:
        self.stack[-1] = self._tuple(self.stack[-1:])

    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self) -> None:
        self.stack[-2:] = [self._tuple(self.stack[-2:])]

    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self) -> None:
        self.stack[-3:] = [self._tuple(self.stack[-3:])]

    dispatch[pickle.TUPLE3[0]] = load_tuple3

    # ---- integers -------------------------------------------------------------------------------

    def load_int(self) -> None:  # protocol 0 'I' (also writes True/False as 01/00)
        data = self.readline()
        if len(data) > 48:
            raise self.format_error(f"refusing an INT of {len(data)} characters")
        self.append(False if data == b"00\n" else True if data == b"01\n" else self._int(int(data, 0)))

    dispatch[pickle.INT[0]] = load_int

    def load_long(self) -> None:  # protocol 0 'L'
        data = self.readline()[:-1]
        if len(data) > 48:
            raise self.format_error(f"refusing a LONG of {len(data)} characters")
        self.append(self._int(int(data.removesuffix(b"L"), 0)))

    dispatch[pickle.LONG[0]] = load_long

    def load_long1(self) -> None:
        n = self.read(1)[0]
        if n > self.MAX_INT_BYTES:
            raise self.format_error(f"refusing an integer of {n} bytes")
        self.append(pickle.decode_long(self.read(n)))

    dispatch[pickle.LONG1[0]] = load_long1

    def load_long4(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        if not 0 <= n <= self.MAX_INT_BYTES:
            raise self.format_error(f"refusing an integer of {n} bytes")
        self.append(pickle.decode_long(self.read(n)))

    dispatch[pickle.LONG4[0]] = load_long4


class _Opaque:
    """What :class:`DryScan` makes of every global and every call: an inert placeholder."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _Opaque:
        return _Opaque()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def update(self, values: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class DryScan(BoundedUnpickler):
    """Walks a pickle without building anything from its globals: every global, call and persistent id
    becomes an inert placeholder, so nothing runs, while the bounds of :class:`BoundedUnpickler`
    (work budget, tuple and integer sizes, no memo preallocation) apply.

    For pickles another loader will read (``torch.load(weights_only=True)`` restricts what is
    called, but not how much work a stream of a few bytes asks for: a tuple key that nests the
    previous tuple twice, 40 times over, takes 2^40 steps to hash).
    """

    new_classes = (_Opaque,)
    build_classes = (_Opaque,)
    mapping_classes = (dict, OrderedDict, _Opaque)
    unsafe_error = RefusedError
    format_error = RefusedError

    def find_class(self, module: str, name: str) -> _Opaque:
        return _Opaque()

    def persistent_load(self, pid: Any) -> _Opaque:
        return _Opaque()

    def _check_new(self, cls: Any, args: Any, what: str) -> None:
        if not isinstance(cls, _Opaque):
            raise self.unsafe_error(f"refusing {what} of {type(cls).__name__}")
        self.charge(1 + sum(self.arg_cost(a) for a in args) if isinstance(args, tuple | list) else 1, what)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args, "NEWOBJ")
        self.append(_Opaque())

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(BoundedUnpickler.dispatch)
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_new(cls, args, "NEWOBJ_EX")
        self.charge(self.arg_cost(kwargs), "NEWOBJ_EX")
        self.append(_Opaque())

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        self._check_new(klass, args, "INST/OBJ")
        self.append(_Opaque())

    def _target(self, classes: tuple[type, ...], what: str) -> Any:
        target = self.stack[-1]
        if isinstance(target, _Opaque):
            return target
        return super()._target(classes, what)


def scan_pickle(data: bytes | io.BytesIO) -> None:
    """Walk the pickle in ``data`` with :class:`DryScan`; :class:`RefusedError` if it exceeds a bound.

    A malformed stream raises what :mod:`pickle` raises (``UnpicklingError``, ``EOFError``, ...).
    """
    DryScan(data).load()
