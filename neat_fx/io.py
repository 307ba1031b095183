def save_adapters(*a, **k): raise NotImplementedError
def load_adapters(*a, **k): raise NotImplementedError
