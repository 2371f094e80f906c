"""Storage and kernels: bit packing of the codes and the optional native decode kernel."""
