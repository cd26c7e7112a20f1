// Asserts that a call raises ArgumentError naming `argument` (what the library promises for every bad
// input), and fails on no error or on any other exception.
#pragma once

#include <gtest/gtest.h>

#include <exception>

#include "msa/error.h"

namespace msa {
namespace testing {

template <class F>
void expect_arg(const char* argument, F f) {
  try {
    f();
    ADD_FAILURE() << "no error; expected ArgumentError naming " << argument;
  } catch (const ArgumentError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ArgumentError naming " << argument << ", got: " << e.what();
  }
}

}  // namespace testing
}  // namespace msa
