// Errors raised by the library. Every rejected input names the argument at fault, so that a caller
// (C++ or Python) can tell which tensor or setting to fix without reading the source.
#pragma once

#include <stdexcept>
#include <string>

namespace msa {

// Base class of everything msa throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bad argument: wrong shape, dtype, stride, device, length, id or too little workspace.
class ArgumentError : public Error {
 public:
  ArgumentError(std::string argument, const std::string& what)
      : Error("msa: argument '" + argument + "': " + what), argument_(std::move(argument)) {}
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

// An operation that exists in the API but not on the backend the tensors live on.
class NotSupportedError : public Error {
 public:
  using Error::Error;
};

}  // namespace msa

#define MSA_CHECK_ARG(cond, arg, msg)                      \
  do {                                                     \
    if (!(cond)) throw ::msa::ArgumentError((arg), (msg)); \
  } while (0)
