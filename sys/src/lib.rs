//! Raw AscendCL bindings, loaded at run time. A placeholder until the Ascend
//! runtime work lands: it declares nothing yet.
