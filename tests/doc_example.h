// Examples shown in the docs are test code: the lines between "// [<marker>]" and "// [/<marker>]" of
// a test source must appear verbatim in a document of the repository, so that neither can rot.
#pragma once

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

namespace msa {
namespace testing {

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// source_file: the test's __FILE__; doc: a path relative to the repository root.
inline void expect_example_in_doc(const std::string& source_file, const std::string& doc,
                                  const std::string& marker) {
  const std::string root = source_file.substr(0, source_file.rfind("/tests/"));
  const std::string source = read_text_file(source_file), text = read_text_file(root + "/" + doc);
  if (text.empty()) GTEST_SKIP() << doc << " not found next to " << source_file;
  const std::string begin = "// [" + marker + "]\n", end = "// [/" + marker + "]";
  const size_t a = source.find(begin), b = source.find(end);
  ASSERT_TRUE(a != std::string::npos && b != std::string::npos && a + begin.size() < b) << marker;
  EXPECT_NE(text.find(source.substr(a + begin.size(), b - a - begin.size())), std::string::npos)
      << doc << "'s example differs from " << source_file;
}

}  // namespace testing
}  // namespace msa
