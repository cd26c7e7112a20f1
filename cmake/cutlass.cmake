# CUTLASS/CuTe headers come from the `nvidia-cutlass` PyPI package (scripts/setup_deps.sh installs it
# into .deps/python); its wheel carries them under cutlass_library/source/include.
set(MSA_CUTLASS_INCLUDE_DIR "" CACHE PATH "Directory holding cute/ and cutlass/ headers")
if(NOT MSA_CUTLASS_INCLUDE_DIR)
  if(EXISTS "${PROJECT_SOURCE_DIR}/.deps/python/cutlass_library/source/include/cute/tensor.hpp")
    set(MSA_CUTLASS_INCLUDE_DIR "${PROJECT_SOURCE_DIR}/.deps/python/cutlass_library/source/include"
        CACHE PATH "" FORCE)
  endif()
endif()
if(NOT MSA_CUTLASS_INCLUDE_DIR)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
      OUTPUT_VARIABLE _cutlass_guess OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(EXISTS "${_cutlass_guess}/cute/tensor.hpp")
      set(MSA_CUTLASS_INCLUDE_DIR "${_cutlass_guess}" CACHE PATH "" FORCE)
    endif()
  endif()
endif()
if(NOT MSA_CUTLASS_INCLUDE_DIR)
  message(FATAL_ERROR "CUTLASS headers not found: run scripts/setup_deps.sh (pip nvidia-cutlass) "
                      "or pass -DMSA_CUTLASS_INCLUDE_DIR=...")
endif()
message(STATUS "msa: CUTLASS headers in ${MSA_CUTLASS_INCLUDE_DIR}")
