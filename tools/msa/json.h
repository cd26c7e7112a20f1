// Just enough JSON for `msa run --json`: a flat-or-nested object written field by field.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>

namespace msa {
namespace tool {

class JsonObject {
 public:
  JsonObject& number(const std::string& key, double v) {
    char buf[32];
    if (std::isfinite(v))
      std::snprintf(buf, sizeof buf, "%.9g", v);
    else
      std::snprintf(buf, sizeof buf, "null");  // JSON has no NaN or infinity
    return raw(key, buf);
  }
  JsonObject& integer(const std::string& key, long long v) { return raw(key, std::to_string(v)); }
  JsonObject& boolean(const std::string& key, bool v) { return raw(key, v ? "true" : "false"); }
  JsonObject& string(const std::string& key, const std::string& v) { return raw(key, quote(v)); }
  JsonObject& object(const std::string& key, const JsonObject& v) { return raw(key, v.str()); }
  JsonObject& raw(const std::string& key, const std::string& json) {
    body_ += (body_.empty() ? "" : ", ") + quote(key) + ": " + json;
    return *this;
  }
  std::string str() const { return "{" + body_ + "}"; }

  static std::string quote(const std::string& s) {
    std::string q = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') q += '\\';
      if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        q += buf;
        continue;
      }
      q += c;
    }
    return q + "\"";
  }

 private:
  std::string body_;
};

}  // namespace tool
}  // namespace msa
