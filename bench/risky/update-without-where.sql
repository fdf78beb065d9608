UPDATE orders SET note = '';
