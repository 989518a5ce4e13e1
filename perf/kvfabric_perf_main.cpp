// placeholder; replaced as the module lands
int main() { return 0; }
