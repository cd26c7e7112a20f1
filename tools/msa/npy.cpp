#include "npy.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace msa {
namespace tool {

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& why) {
  throw std::runtime_error(path + ": " + why);
}

// Value of `key` in the header dict, e.g. 'descr': '<f4' -> <f4.
std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  const size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) fail(path, "npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t begin = header.find_first_not_of(" ", colon + 1);
  if (header[begin] == '(') return header.substr(begin + 1, header.find(')', begin) - begin - 1);
  if (header[begin] == '\'') return header.substr(begin + 1, header.find('\'', begin + 1) - begin - 1);
  return header.substr(begin, header.find_first_of(",}", begin) - begin);
}

DType dtype_of_descr(const std::string& descr, const std::string& path) {
  if (descr == "<f4") return DType::f32;
  if (descr == "<f2") return DType::f16;
  if (descr == "<f8") return DType::f64;
  if (descr == "<i4") return DType::i32;
  fail(path, "unsupported dtype '" + descr + "' (float32, float16, float64 or int32, little endian)");
}

}  // namespace

HostTensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open");
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) fail(path, "not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint8_t b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (uint32_t(b[1]) << 8);
  } else {
    uint8_t b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
  }
  std::string header(header_len, '\0');
  if (!in.read(&header[0], header_len)) fail(path, "truncated header");
  if (header_field(header, "fortran_order", path) != "False") fail(path, "Fortran order is not supported");
  const DType dtype = dtype_of_descr(header_field(header, "descr", path), path);
  std::vector<int64_t> shape;
  const std::string dims = header_field(header, "shape", path);
  for (size_t i = 0; i < dims.size();) {
    size_t j = dims.find(',', i);
    if (j == std::string::npos) j = dims.size();
    const std::string tok = dims.substr(i, j - i);
    if (tok.find_first_not_of(" ") != std::string::npos) shape.push_back(std::stoll(tok));
    i = j + 1;
  }
  HostTensor t(dtype, shape);
  const std::streamsize bytes = std::streamsize(t.numel() * int64_t(dtype_size(dtype)));
  if (!in.read(static_cast<char*>(t.data()), bytes)) fail(path, "truncated data");
  return t;
}

void write_npy(const std::string& path, const HostTensor& t) {
  if (t.dtype() == DType::bf16) {
    write_npy(path, convert(t, DType::f32));
    return;
  }
  const char* descr = t.dtype() == DType::f32 ? "<f4"
                      : t.dtype() == DType::f16 ? "<f2"
                      : t.dtype() == DType::f64 ? "<f8"
                                                : "<i4";
  std::string shape;
  for (int64_t s : t.shape()) shape += std::to_string(s) + ",";
  if (t.shape().size() > 1) shape.pop_back();
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" +
                       shape + "), }";
  // Pad so that magic (6) + version (2) + length (2) + header is a multiple of 64, ending in '\n'.
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) fail(path, "cannot create");
  const uint16_t len = uint16_t(header.size());
  const char version[2] = {1, 0};
  out.write("\x93NUMPY", 6);
  out.write(version, 2);
  const char len_bytes[2] = {char(len & 0xff), char(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), std::streamsize(header.size()));
  HostTensor& mutable_t = const_cast<HostTensor&>(t);  // data() has no const overload
  out.write(static_cast<const char*>(mutable_t.data()),
            std::streamsize(t.numel() * int64_t(dtype_size(t.dtype()))));
  if (!out) fail(path, "write failed");
}

HostTensor convert(const HostTensor& t, DType dtype) {
  HostTensor r(dtype, t.shape());
  for (int64_t i = 0; i < t.numel(); ++i) r.set(i, t.get(i));
  return r;
}

}  // namespace tool
}  // namespace msa
