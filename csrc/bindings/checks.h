// Argument checks of the Python bindings. They throw pybind11's own exceptions, which the
// extension's pybind11 translates by itself, instead of c10's TORCH_CHECK_* errors, whose
// translation and backtrace capture live in torch's libraries: on the H200 machine of 2026-11-28
// (torch 2.11, Python 3.12) a TORCH_CHECK_VALUE in an argument check of this extension ended
// the process with a segmentation fault instead of raising ValueError (benchmarks/probe_errors.py
// checks this on any machine). Messages are built with c10::str as before.
#pragma once

#include <torch/extension.h>

#define RAAD_CHECK_VALUE(cond, ...)                          \
  do {                                                       \
    if (!(cond)) throw pybind11::value_error(c10::str(__VA_ARGS__)); \
  } while (0)

#define RAAD_CHECK_TYPE(cond, ...)                           \
  do {                                                       \
    if (!(cond)) throw pybind11::type_error(c10::str(__VA_ARGS__)); \
  } while (0)

#define RAAD_CHECK_RUNTIME(cond, ...)                        \
  do {                                                       \
    if (!(cond)) throw std::runtime_error(c10::str(__VA_ARGS__)); \
  } while (0)
